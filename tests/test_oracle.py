import statistics

from dflash_edge.bench.oracle import OracleDrafts


def test_oracle_proposes_the_reference_and_breaks_it_so_the_mean_acceptance_is_tau():
    reference = list(range(100, 400))
    for tau in (1.0, 2.5, 6.5, 16.0):
        oracle = OracleDrafts(reference, tau, vocab_size=1000, seed=0)
        accepted = []
        for start in range(0, 200, 3):
            proposal = oracle(reference[:start], [0] * 15)
            assert len(proposal) == 15
            k = 0
            while k < 15 and proposal[k] == reference[start + k]:
                k += 1
            accepted.append(k + 1)  # + the bonus token
        assert abs(statistics.mean(accepted) - tau) < 0.35, (tau, statistics.mean(accepted))
