"""Lossless sampling: DFlash's samples are distributed as plain sampling's.

Chi-square tests with a fixed false-alarm rate (alpha = 1e-4 per comparison, a handful of comparisons),
on seeds fixed in the test: the result is the same every run, and a correct sampler passes.
"""
import math
from collections import Counter

import numpy as np
import pytest

from dflash_edge.errors import UserError
from dflash_edge.runtime.generate import generate
from dflash_edge.runtime.model import ExportedModel
from dflash_edge.runtime.sampling import Sampler, Sampling

from drafts import accepted_drafts, multi_token_rounds, rewriter

Z = 3.719  # one-sided standard normal quantile for alpha = 1e-4


def critical(dof: int) -> float:
    """Chi-square critical value at alpha 1e-4 (Wilson-Hilferty: a few % above the exact one at small dof,
    which only makes the test stricter about false alarms)."""
    return dof * (1 - 2 / (9 * dof) + Z * math.sqrt(2 / (9 * dof))) ** 3


def pooled(counts: list[Counter], min_total: int = 10) -> list[list[int]]:
    """Per category, the count in each sample; categories seen fewer than min_total times in all pooled."""
    cats = set().union(*counts)
    common = [c for c in cats if sum(n[c] for n in counts) >= min_total]
    rows = [[n[c] for n in counts] for c in common]
    rest = [sum(n[c] for c in cats - set(common)) for n in counts]
    if sum(rest):
        rows.append(rest)
    return rows


def two_sample_chi2(a: Counter, b: Counter) -> tuple[float, int]:
    na, nb = sum(a.values()), sum(b.values())
    rows = pooled([a, b])
    stat = sum((x * math.sqrt(nb / na) - y * math.sqrt(na / nb)) ** 2 / (x + y) for x, y in rows)
    return stat, len(rows) - 1


@pytest.fixture(scope="module")
def model(tiny_llama):
    m = ExportedModel(tiny_llama[2])
    m.stop_token_ids = set()
    return m


def prompt(model):
    return model.tokenizer.encode("the cat sat on the mat and")


def test_sampler_draws_from_the_target_distribution(model):
    logits = model.prefill(prompt(model), model.new_target_cache(), logits=True)[0].logits
    sampling = Sampling(temperature=1.5)
    ids, p = Sampler(sampling).probabilities(logits[-1])
    n = 4000
    draws = Counter(Sampler(Sampling(1.5, seed=s)).choose(logits[-1], 7) for s in range(n))
    expected = dict(zip(ids.tolist(), (n * p).tolist()))
    common = [t for t, e in expected.items() if e >= 10]
    rest = n - sum(expected[t] for t in common)
    stat = sum((draws[t] - expected[t]) ** 2 / expected[t] for t in common)
    observed_rest = n - sum(draws[t] for t in common)
    if rest >= 1:
        stat += (observed_rest - rest) ** 2 / rest
    assert len(common) >= 5, "the test needs a spread-out distribution"
    assert stat < critical(len(common) - (0 if rest >= 1 else 1))


def test_top_k_and_top_p_restrict_the_candidates():
    logits = np.array([0.0, 3.0, 1.0, 2.0, -1.0])
    ids, p = Sampler(Sampling(1.0, top_k=2)).probabilities(logits)
    assert ids.tolist() == [1, 3] and abs(p.sum() - 1) < 1e-12
    ids, _ = Sampler(Sampling(1.0, top_p=0.01)).probabilities(logits)
    assert ids.tolist() == [1]
    ids, p = Sampler(Sampling(1.0, top_p=0.9)).probabilities(logits)
    full = np.exp(logits) / np.exp(logits).sum()
    assert full[ids].sum() >= 0.9 > np.sort(full)[::-1][: len(ids) - 1].sum()
    for bad in (Sampling(-1.0), Sampling(1.0, top_k=-2), Sampling(1.0, top_p=0.0), Sampling(1.0, top_p=1.5)):
        with pytest.raises(UserError):
            bad.check()


def _samples(model, ids, seeds, block, temperature, drafts=None):
    runs = [generate(model, ids, 5, block_size=block, sampling=Sampling(temperature, seed=s), draft_fn=drafts)
            for s in seeds]
    return [r[0] for r in runs], [r[1] for r in runs]


def test_dflash_sampling_is_distributed_as_plain_sampling(model):
    ids = prompt(model)
    greedy = generate(model, ids, 12, block_size=1)[0]

    def greedy_drafts(committed, block):  # plausible drafts: the greedy path, where the sample follows it
        done = len(committed) - len(ids)
        return (greedy[done:] + [0] * block)[: block - 1]

    n, t = 400, 0.4  # warm enough to spread the samples, cool enough for the greedy drafts to land often
    plain, _ = _samples(model, ids, range(n), 1, t)
    dflash, stats = _samples(model, ids, range(n, 2 * n), 4, t, greedy_drafts)
    assert sum(s.tau for s in stats) / n > 1.3, "drafts were rarely accepted: the test would prove little"
    dofs = []
    for pos in range(5):
        stat, dof = two_sample_chi2(Counter(o[pos] for o in plain), Counter(o[pos] for o in dflash))
        assert stat < critical(max(dof, 1)), f"position {pos}: chi2 {stat:.1f} on {dof} dof"
        dofs.append(dof)
    assert sum(d >= 2 for d in dofs) >= 4, "the samples are too concentrated to test"
    # The test has power: a cooler plain sampler (closer to the greedy drafts) is told apart.
    cooler, _ = _samples(model, ids, range(n), 1, 0.25)
    tests = [two_sample_chi2(Counter(o[pos] for o in plain), Counter(o[pos] for o in cooler)) for pos in range(5)]
    assert sum(stat for stat, _ in tests) > critical(sum(dof for _, dof in tests))


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3):
    m = ExportedModel(tiny_qwen3[2])
    m.stop_token_ids = set()
    return m


SETTINGS = [Sampling(0.7), Sampling(1.0, top_k=5), Sampling(1.2, top_p=0.8), Sampling(0.8, top_k=20, top_p=0.9)]


@pytest.mark.parametrize("setting", SETTINGS, ids=["t0.7", "top_k5", "top_p0.8", "top_k20_top_p0.9"])
@pytest.mark.parametrize("target", ["model", "qwen3"])
def test_same_seed_gives_the_same_sample_with_or_without_drafts(request, target, setting):
    """The real drafter runs, then its drafts become plain sampling's reply for the seed (a quarter of them
    wrong), so verifies keep their later rows: each kept row must be sampled at its own position, as plain
    decoding sampled it. With a random drafter's drafts only row 0 would ever be kept."""
    model = request.getfixturevalue(target)
    ids = prompt(model)
    accepted, replies = 0, set()
    for s in range(12):
        sampling = Sampling(setting.temperature, setting.top_k, setting.top_p, seed=s)
        plain = generate(model, ids, 16, block_size=1, sampling=sampling)[0]
        got, stats = generate(model, ids, 16, block_size=8, sampling=sampling,
                              rewrite_drafts=rewriter(model, plain, wrong=0.25, seed=s))
        assert got == plain, f"seed {s}"
        assert multi_token_rounds(stats) >= 1, f"seed {s}: no round kept two drafts"
        accepted += accepted_drafts(stats)
        replies.add(tuple(plain))
    assert accepted >= 12 * 5, "drafts were rarely accepted: the test would prove little"
    assert len(replies) >= 8, "the seeds drew nearly the same reply: the sampler was not tested"


@pytest.mark.parametrize("setting", [Sampling(2.0, top_k=1), Sampling(2.0, top_p=1e-6)], ids=["top_k1", "top_p1e-6"])
def test_a_single_candidate_samples_the_greedy_reply_with_drafts(model, setting):
    """top_k 1 (or a top_p only the likeliest token reaches) leaves one candidate: however hot, the reply is
    greedy decoding's. A verify row that skipped top-k / top-p would sample at temperature 2 instead."""
    ids = prompt(model)
    greedy = generate(model, ids, 16, block_size=1)[0]
    for s in range(4):
        sampling = Sampling(setting.temperature, setting.top_k, setting.top_p, seed=s)
        got, stats = generate(model, ids, 16, block_size=8, sampling=sampling,
                              rewrite_drafts=rewriter(model, greedy, wrong=0.25, seed=s))
        assert got == greedy and accepted_drafts(stats) > 0
