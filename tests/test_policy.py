"""The per-round block choice: plain decoding when drafts fail, the whole block when they land."""
import numpy as np

from dflash_edge.runtime.policy import BlockPolicy

# Round cost per block size in plain steps, shaped like the measured SmolLM2 curve (index = block size).
COSTS = np.array([np.inf, 1.0, 1.3, 1.4, 1.5, 1.55, 1.6, 1.65, 1.7, 1.8, 1.9, 2.0, 2.05, 2.1, 2.2, 2.3, 2.4])


def run(policy, accept, rounds=200):
    """accept(block) -> drafts accepted that round. Returns the blocks chosen."""
    chosen = []
    for _ in range(rounds):
        block = policy.choose()
        policy.update(block, accept(block))
        chosen.append(block)
    return chosen


def test_useless_drafts_fall_back_to_plain_decoding_and_keep_probing():
    chosen = run(BlockPolicy(COSTS), lambda block: 0)
    tail = chosen[50:]
    assert tail.count(1) / len(tail) > 0.9
    # It keeps trying one draft now and then, so a drafter that starts to land is noticed.
    assert 2 in tail and max(tail) == 2


def test_drafts_that_always_land_use_the_whole_block():
    chosen = run(BlockPolicy(COSTS), lambda block: block - 1)
    assert chosen[-50:] == [16] * 50


def test_moderate_acceptance_picks_a_middle_block():
    rng = np.random.default_rng(0)

    def accept(block):  # each draft lands with probability 0.6 given the previous one did
        n = 0
        while n < block - 1 and rng.random() < 0.6:
            n += 1
        return n
    chosen = run(BlockPolicy(COSTS), accept, rounds=400)
    typical = max(set(chosen[100:]), key=chosen[100:].count)
    assert 2 <= typical <= 8


def test_it_follows_a_change_in_acceptance():
    policy = BlockPolicy(COSTS)
    run(policy, lambda block: block - 1, rounds=100)
    chosen = run(policy, lambda block: 0, rounds=150)
    assert chosen[-20:].count(1) >= 15


def test_probes_stay_cheap_where_a_two_token_verify_is_expensive():
    costly = COSTS.copy()
    costly[2:] += 1.0  # verifying 2 tokens costs 2.3 steps (as int4 on the 2-core CPU)
    chosen = run(BlockPolicy(costly), lambda block: 0, rounds=400)
    extra = sum(costly[b] - 1.0 for b in chosen[50:]) / len(chosen[50:])
    assert 2 in chosen[50:] and extra < 0.03


def test_drafting_rounds_slower_than_measured_tip_the_choice_back_to_plain():
    """Start-up costs say block 2 pays at 40 % acceptance; the rounds' own times say it does not."""
    rng = np.random.default_rng(0)
    costs = COSTS.copy()
    costs[2] = 1.2  # 1.4 tokens for 1.2 steps: worth drafting on paper

    def rounds(policy, real_cost_of_two):
        chosen = []
        for _ in range(300):
            block = policy.choose()
            accepted = min(block - 1, int(rng.random() < 0.4))
            seconds = 0.016 * (1.0 if block == 1 else real_cost_of_two + 0.1 * (block - 2))
            policy.update(block, accepted, seconds)
            chosen.append(block)
        return chosen[100:]

    as_measured = rounds(BlockPolicy(costs), 1.2)
    assert as_measured.count(2) > 0.8 * len(as_measured)
    slower = rounds(BlockPolicy(costs), 1.5)  # wake-ups and cold caches: 1.4 tokens for 1.5 steps
    assert slower.count(1) > 0.8 * len(slower)
