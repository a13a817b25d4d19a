"""At temperature 0 DFlash emits exactly what plain decoding of the same target graph emits."""
import random
from collections import Counter

import numpy as np
import pytest

from dflash_edge.runtime.generate import generate
from dflash_edge.runtime.cache import KVCache
from dflash_edge.runtime.model import ExportedModel

from drafts import accepted_drafts, fixed_costs, multi_token_rounds, record_verifies, rewriter, rounds_emitted

PROMPTS = ["hi", "the cat sat on the mat", "def sort list : return list . sort ( ) and print the big red list " * 3]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model = ExportedModel(tiny_llama[2])
    model.stop_token_ids = set()  # tiny random models rarely stop; stops are tested explicitly below
    return model


def plain(model, prompt_ids, n):
    return generate(model, prompt_ids, n, block_size=1)[0]


def oracle(reference, prompt_len, corrupt=0.0, seed=0):
    """Propose the true continuation, each draft wrong with probability `corrupt`."""
    rng = random.Random(seed)

    def draft(committed, block):
        done = len(committed) - prompt_len
        truth = reference[done:done + block - 1]
        truth += [0] * (block - 1 - len(truth))
        return [t if rng.random() >= corrupt else (t + 1) % 50 for t in truth]
    return draft


def drafted(rewrite=None):
    """A rewrite_drafts hook that records each round's (tokens generated so far, the drafter's own proposals),
    then hands the proposals on (through `rewrite` when given)."""
    rounds = []

    def hook(out, drafts):
        rounds.append((len(out), list(drafts)))
        return rewrite(out, drafts) if rewrite else drafts
    return hook, rounds


@pytest.mark.parametrize("block", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_drafter_is_lossless(llama, prompt, block):
    ids = llama.tokenizer.encode(prompt)
    spy, rounds = drafted()
    got, stats = generate(llama, ids, 40, block_size=block, rewrite_drafts=spy)
    reference = plain(llama, ids, 40)
    assert got == reference
    assert stats.rounds >= 1 and 1.0 <= stats.tau <= block  # a smoke check only: true of any round counts
    # Each round kept exactly the drafter's proposals that agree with plain decoding, plus one token (fewer
    # where max_new_tokens cut it): a loop that dropped an agreeing draft would stay lossless, not pass this.
    expected = Counter()
    for done, drafts in rounds:
        kept = 0
        while kept < len(drafts) and drafts[kept] == reference[done + kept]:
            kept += 1
        expected[min(kept + 1, 40 - done)] += 1
    assert stats.rounds == len(rounds) and stats.acceptance == expected
    assert sum(k * n for k, n in stats.acceptance.items()) == len(got) - 1  # all but prefill's token


@pytest.mark.parametrize("block", [2, 5, 16])
def test_oracle_drafts_are_all_accepted(llama, block):
    ids = llama.tokenizer.encode(PROMPTS[1])
    reference = plain(llama, ids, 49)
    got, stats = generate(llama, ids, 49, block_size=block, draft_fn=oracle(reference, len(ids)))
    assert got == reference
    # Every round commits a full block, except where max_new_tokens cuts the last one.
    full_rounds = (49 - 1) // block
    assert stats.acceptance[block] == full_rounds
    assert stats.rounds == full_rounds + (1 if (49 - 1) % block else 0)


@pytest.mark.parametrize("corrupt", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("block", [4, 16])
def test_wrong_drafts_never_change_the_output(llama, corrupt, block):
    ids = llama.tokenizer.encode(PROMPTS[2])
    reference = plain(llama, ids, 45)
    got, stats = generate(llama, ids, 45, block_size=block, draft_fn=oracle(reference, len(ids), corrupt))
    assert got == reference
    if corrupt == 1.0:
        assert stats.tau == 1.0


def test_random_drafts_never_change_the_output(llama):
    ids = llama.tokenizer.encode(PROMPTS[0])
    rng = random.Random(1)
    got, _ = generate(llama, ids, 30, block_size=8,
                      draft_fn=lambda c, b: [rng.randrange(llama.target_info["vocab_size"]) for _ in range(b - 1)])
    assert got == plain(llama, ids, 30)


@pytest.mark.parametrize("max_new", [1, 2, 7, 17, 18, 33])
def test_max_new_tokens_inside_a_block(llama, max_new):
    ids = llama.tokenizer.encode(PROMPTS[1])
    reference = plain(llama, ids, 40)
    for draft_fn in (None, oracle(reference, len(ids))):
        got, stats = generate(llama, ids, max_new, block_size=8, draft_fn=draft_fn)
        assert got == reference[:max_new]
        assert stats.finish_reason == "length"


@pytest.mark.parametrize("stop_at", [3, 9, 14])
def test_stop_token_inside_an_accepted_block(llama, stop_at):
    ids = llama.tokenizer.encode(PROMPTS[2])
    reference = plain(llama, ids, 40)
    stop = reference[stop_at]
    first = reference.index(stop)
    try:
        llama.stop_token_ids = {stop}
        for draft_fn in (None, oracle(reference, len(ids))):
            got, stats = generate(llama, ids, 40, block_size=16, draft_fn=draft_fn)
            assert got == reference[:first + 1], "output must end exactly at the first stop token"
            assert stats.finish_reason == "stop"
    finally:
        llama.stop_token_ids = set()


def lookup_rounds_setup(model, monkeypatch):
    """Fixed costs on which every round with a prompt-lookup proposal verifies it (verifying costs one step
    whatever its length), the drafter never pays and may not run, and a record of each round's verify: one
    of more than a token is a lookup round."""
    fixed_costs(monkeypatch, model, verify_step=0.0)

    def no_drafter(*args, **kwargs):
        raise AssertionError("the drafter ran")
    monkeypatch.setattr(model, "draft", no_drafter)
    return record_verifies(monkeypatch, model)


def copying_prompt(model):
    """A prompt, its greedy reply and what each round emitted, where a lookup round kept copied drafts that
    hold the reply's first use of a token (with more tokens after it in the round): only there can a stop
    token fall inside an accepted lookup block. A random model's reply copies little from its prompt, so the
    prompt is extended by the model's own continuation until one does. Returns (ids, reply, rounds, the
    first use's index in the reply)."""
    base = model.tokenizer.encode("def sort list : return list . sort ( )")
    continuation = plain(model, base, 80)
    for cut in range(40, 80):
        ids = base + continuation[:cut]
        reply, _, rounds = rounds_emitted(model, ids, 30)
        assert reply == plain(model, ids, 30)
        done = 0
        for emitted in rounds:
            for offset, token in enumerate(emitted[:-1]):
                if token not in reply[:done + offset]:
                    return ids, reply, rounds, done + offset
            done += len(emitted)
    pytest.fail("no prompt found whose reply's lookup rounds keep a token the reply had not used yet")


def test_stop_token_inside_an_accepted_lookup_block(llama, monkeypatch):
    verified = lookup_rounds_setup(llama, monkeypatch)
    ids, reference, rounds, first = copying_prompt(llama)
    try:
        llama.stop_token_ids = {reference[first]}
        verified.clear()
        got, stats, cut = rounds_emitted(llama, ids, 30)
    finally:
        llama.stop_token_ids = set()
    assert got == reference[:first + 1] and stats.finish_reason == "stop"
    # The last round is the uncut run's lookup round, its tokens after the stop dropped.
    last = len(cut) - 1
    assert cut[:last] == rounds[:last] and len(verified[-1][1]) >= 2
    assert len(cut[last]) < len(rounds[last]) and rounds[last][:len(cut[last])] == cut[last]
    assert stats.lookup_rounds >= 1 and stats.lookup_tokens >= len(cut[last])


def test_max_new_tokens_inside_an_accepted_lookup_block(llama, monkeypatch):
    verified = lookup_rounds_setup(llama, monkeypatch)
    ids, reference, rounds, _ = copying_prompt(llama)
    cases = 0
    done = 0
    for emitted in rounds:
        for inside in range(1, len(emitted)):  # max_new_tokens ends the reply this far into the round
            verified.clear()
            got, stats, cut = rounds_emitted(llama, ids, done + inside)
            assert got == reference[:done + inside] and stats.finish_reason == "length"
            assert stats.new_tokens == done + inside == sum(len(e) for e in cut)
            # The round that reached max_new_tokens verified copied drafts, and kept them up to the limit.
            assert len(verified[-1][1]) >= 2 and stats.lookup_rounds >= 1
            cases += 1
        done += len(emitted)
    assert cases >= 3, "too few lookup rounds kept copied drafts to cut one"


def test_each_committed_token_is_projected_once(llama, monkeypatch):
    ids = llama.tokenizer.encode(PROMPTS[1])
    calls = []
    original = llama.project_context

    def spy(pending, cache):
        calls.append((cache.length, sum(keep for _, keep in pending)))
        return original(pending, cache)
    monkeypatch.setattr(llama, "project_context", spy)
    out, _ = generate(llama, ids, 30, block_size=4)
    position = 0
    for start, n in calls:
        assert start == position, "context projected out of order or twice"
        position += n
    # Everything committed before the last round was projected: the prompt and all tokens but the newest.
    assert position >= len(ids)
    assert position <= len(ids) + len(out) - 1


def draft_cache_after(model, monkeypatch, ids, n, rewrite):
    """Generate with the drafter's proposals rewritten; return (tokens, stats, the drafter's own proposals,
    the draft cache's committed K/V per layer at the end)."""
    caches = []
    original = model.project_context

    def spy(pending, cache):
        caches.append(cache)
        return original(pending, cache)
    monkeypatch.setattr(model, "project_context", spy)
    hook, rounds = drafted(rewrite)
    got, stats = generate(model, ids, n, block_size=8, rewrite_drafts=hook)
    monkeypatch.setattr(model, "project_context", original)
    cache = caches[-1]
    return got, stats, [d for _, d in rounds], [cache.layer(i) for i in range(model.drafter_info["num_layers"])]


def test_device_path_is_lossless_on_the_cpu(llama, monkeypatch):
    """What differs on a GPU, run here: caches reserved for the whole generation up front, and each round's
    taps projected whole (rejected rows included, overwritten by the next round) instead of joined."""
    ids = llama.tokenizer.encode(PROMPTS[2])
    reference = plain(llama, ids, 50)
    host = draft_cache_after(llama, monkeypatch, ids, 50, rewriter(llama, reference, wrong=0.3))
    monkeypatch.setattr(llama, "on_host", False)
    for block in (None, 4, 16):
        assert generate(llama, ids, 50, block_size=block)[0] == reference
    # The real drafter runs (taps projected the device's way), its proposals then rewritten to the reference
    # with 30 % wrong: rounds keep several rows and reject others, the case the overwrite must get right.
    got, stats, proposals, layers = draft_cache_after(llama, monkeypatch, ids, 50,
                                                      rewriter(llama, reference, wrong=0.3))
    assert got == reference and multi_token_rounds(stats) >= 3 and accepted_drafts(stats) >= 15
    # The draft cache holds what the host path's joined projection gave it, and the drafter proposed the same.
    assert proposals == host[2]
    assert len(layers) == len(host[3]) >= 1
    for (keys, values), (host_keys, host_values) in zip(layers, host[3]):
        assert keys.shape == host_keys.shape and keys.shape[2] >= len(ids) + 40
        np.testing.assert_allclose(keys, host_keys, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values, host_values, rtol=1e-5, atol=1e-5)


def test_graphs_write_the_caches_in_place(llama):
    """A step copies no cache: the graph's present outputs are the cache's own memory."""
    ids = llama.tokenizer.encode(PROMPTS[1])
    cache = llama.new_target_cache(len(ids) + 8)
    before = [v.data_ptr() for v in cache.values]
    llama.prefill(ids, cache)
    step = llama.run_target([5, 6, 7], cache, last_only=False, taps=True)
    assert [v.data_ptr() for v in cache.values] == before
    keys, values = cache._host[0], cache._host[1]
    assert keys[0, :, len(ids):len(ids) + 3].any() and values[0, :, :, len(ids):len(ids) + 3].any()
    assert not keys[0, :, len(ids) + 3:].any(), "nothing written past the new positions"
    draft_cache = llama.new_draft_cache(len(ids) + 8)
    before = [v.data_ptr() for v in draft_cache.values]
    llama.project_context([(step.taps, 2)], draft_cache)
    assert [v.data_ptr() for v in draft_cache.values] == before and draft_cache.length == 2
    assert draft_cache._host[0][0, :, :3].any() and not draft_cache._host[0][0, :, 3:].any()


def test_qwen3_drafter_is_lossless(tiny_qwen3):
    model = ExportedModel(tiny_qwen3[2])
    model.stop_token_ids = set()
    ids = model.tokenizer.encode(PROMPTS[2])
    reference = plain(model, ids, 40)
    for block in (2, 7, 16):
        assert generate(model, ids, 40, block_size=block)[0] == reference
        got, _ = generate(model, ids, 40, block_size=block, draft_fn=oracle(reference, len(ids), 0.2))
        assert got == reference


@pytest.mark.parametrize("prompt", PROMPTS)
def test_per_round_block_choice_is_lossless(llama, prompt):
    ids = llama.tokenizer.encode(prompt)
    got, stats = generate(llama, ids, 60)  # block_size None: the policy picks every round
    assert got == plain(llama, ids, 60)
    assert stats.as_dict()["block_size"] == "auto"
    assert sum(stats.blocks.values()) == stats.rounds


def test_cache_grows_past_its_chunks_without_changing_the_output(llama):
    """Rollbacks and buffer growth (every KVCache.CHUNK positions) across a long reply."""
    ids = llama.tokenizer.encode(PROMPTS[2])
    n = 2 * KVCache.CHUNK + 5
    reference = plain(llama, ids, n)
    got, _ = generate(llama, ids, n, block_size=8, draft_fn=oracle(reference, len(ids), corrupt=0.3))
    assert got == reference
    cache = llama.new_target_cache()
    llama.run_target(ids, cache, last_only=True)
    cache.commit(len(ids))
    assert cache.length == len(ids) and cache.capacity % KVCache.CHUNK == 0
    llama.run_target([1, 2, 3], cache, last_only=False)
    cache.commit(1)  # two rejected drafts: only the first new position is kept
    keys, _ = cache.layer(0)
    assert keys.shape[2] == len(ids) + 1
