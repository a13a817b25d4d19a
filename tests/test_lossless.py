"""At temperature 0 DFlash emits exactly what plain decoding of the same target graph emits."""
import random

import pytest

from dflash_edge.runtime.generate import generate
from dflash_edge.runtime.cache import KVCache
from dflash_edge.runtime.model import ExportedModel

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


@pytest.mark.parametrize("block", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_drafter_is_lossless(llama, prompt, block):
    ids = llama.tokenizer.encode(prompt)
    got, stats = generate(llama, ids, 40, block_size=block)
    assert got == plain(llama, ids, 40)
    assert stats.rounds >= 1 and 1.0 <= stats.tau <= block


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


def test_device_path_is_lossless_on_the_cpu(llama, monkeypatch):
    """What differs on a GPU, run here: caches reserved for the whole generation up front, and each round's
    taps projected whole (rejected rows included, overwritten by the next round) instead of joined."""
    monkeypatch.setattr(llama, "on_host", False)
    ids = llama.tokenizer.encode(PROMPTS[2])
    reference = plain(llama, ids, 50)
    for block in (None, 4, 16):
        assert generate(llama, ids, 50, block_size=block)[0] == reference
    got, _ = generate(llama, ids, 50, block_size=8, draft_fn=oracle(reference, len(ids), corrupt=0.3))
    assert got == reference


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
