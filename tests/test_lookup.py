"""Prompt lookup: drafts copied from the context are verified like the drafter's and change nothing."""
import random

import pytest

from dflash_edge.runtime.generate import generate
from dflash_edge.runtime.lookup import PromptLookup
from dflash_edge.runtime.model import ExportedModel
from dflash_edge.runtime.sampling import Sampling

from drafts import fixed_costs, record_verifies


def test_the_latest_earlier_occurrence_of_the_ending_is_continued():
    assert PromptLookup([5, 6, 7, 8, 5, 6]).propose(3) == [7, 8, 5]
    assert PromptLookup([1, 2, 7, 1, 2, 8, 1, 2]).propose(3) == [8, 1, 2]  # the latest, not the first
    assert PromptLookup([1, 2, 7, 1, 2, 8, 1, 2]).propose(1) == [8]


def test_a_longer_matching_ending_wins_over_a_more_recent_shorter_one():
    ids = [1, 2, 3, 9, 7, 2, 3, 8, 1, 2, 3]
    assert PromptLookup(ids).propose(2) == [9, 7]            # [1, 2, 3] occurred at the start
    assert PromptLookup(ids, longest=2).propose(2) == [8, 1]  # only pairs: [2, 3] last came before 8
    line = list(range(10, 18))
    ids = line + [99] + line[4:] + [55] + line  # the line's last 4 tokens recur, followed by 55
    assert PromptLookup(ids).propose(3) == [99, 14, 15]              # the whole 8-token line matched
    assert PromptLookup(ids, longest=4).propose(3) == [55, 10, 11]


def test_no_proposal_without_an_earlier_occurrence():
    assert PromptLookup([1, 2, 3, 4]).propose(5) == []
    assert PromptLookup([4]).propose(5) == []
    assert PromptLookup([]).propose(5) == []
    assert PromptLookup([3, 1, 3]).propose(5) == []  # a single token is too short a match by default
    assert PromptLookup([3, 1, 3], shortest=1).propose(5) == [1, 3]


def test_a_repeated_token_proposes_more_of_it():
    assert PromptLookup([4, 9, 9, 9]).propose(4) == [9]  # all the context has after the earlier [9, 9]


def test_growing_the_sequence_proposes_what_a_fresh_lookup_would():
    rng = random.Random(0)
    ids = [rng.randrange(6) for _ in range(300)]
    grown = PromptLookup(ids[:10])
    done = 10
    while done < len(ids):
        step = rng.randrange(1, 5)
        grown.extend(ids[done:done + step])
        done += step
        assert grown.propose(7) == PromptLookup(ids[:done]).propose(7)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model = ExportedModel(tiny_llama[2])
    model.stop_token_ids = set()
    return model


REPETITIVE = "one two three four one two three four one two three four one two"


def test_lookup_rounds_are_lossless_and_taken_where_the_reply_repeats(llama, monkeypatch):
    ids = llama.tokenizer.encode(REPETITIVE)
    plain = generate(llama, ids, 80, block_size=1)[0]
    assert generate(llama, ids, 80)[0] == plain  # the per-round choice on measured costs, whatever it took
    # On fixed costs the rounds follow from the tokens alone, so the lookup rounds are there every run.
    fixed_costs(monkeypatch, llama)
    got, stats = generate(llama, ids, 80)
    assert got == plain
    # A tiny random model's greedy reply loops, so copied drafts land: the path above was exercised.
    assert stats.lookup_rounds > 0 and stats.lookup_tokens > stats.lookup_rounds
    assert stats.as_dict()["lookup_tokens"] == stats.lookup_tokens
    without, stats = generate(llama, ids, 80, lookup=False)
    assert without == plain and stats.lookup_rounds == 0


def test_lookup_rounds_keep_sampling_exact(llama, monkeypatch):
    """Copied drafts depend only on committed tokens, so each seed draws the same reply as plain sampling;
    the copies kept were sampled at their own positions, as plain decoding sampled them."""
    fixed_costs(monkeypatch, llama)  # the drafter never pays: every verify of more than a token is a lookup round
    verifies = record_verifies(monkeypatch, llama)
    ids = llama.tokenizer.encode(REPETITIVE)
    kept = 0
    for seed in range(12):
        sampling = Sampling(0.3, seed=seed)
        plain = generate(llama, ids, 40, block_size=1, sampling=sampling)[0]
        verifies.clear()
        got, stats = generate(llama, ids, 40, sampling=sampling)
        assert got == plain, f"seed {seed}"
        # Replay each lookup round: its drafts are what the context proposed, and it kept those that agree
        # with plain sampling's reply, plus one token of the target's own (cut at max_new_tokens).
        rounds = tokens = 0
        for position, verified in verifies:
            done = position - len(ids) + 1  # reply tokens committed before this round
            drafts = verified[1:]
            if not drafts:
                continue
            assert PromptLookup(ids + plain[:done]).propose(len(drafts)) == drafts, f"seed {seed}"
            agree = next((i for i, t in enumerate(drafts) if t != plain[done + i]), len(drafts))
            rounds += 1
            tokens += min(agree + 1, 40 - done)
            kept += min(agree, 40 - done)
        assert (stats.lookup_rounds, stats.lookup_tokens) == (rounds, tokens), f"seed {seed}"
    assert kept >= 5, "copied drafts were rarely kept: the rounds above proved little"


def test_a_folder_without_a_drafter_decodes_with_lookup_drafts(tiny_llama, monkeypatch):
    target_only = ExportedModel(tiny_llama[2], load_drafter=False)
    target_only.stop_token_ids = set()
    fixed_costs(monkeypatch, target_only)
    ids = target_only.tokenizer.encode(REPETITIVE)
    plain = generate(target_only, ids, 80, block_size=1)[0]
    got, stats = generate(target_only, ids, 80)
    assert got == plain and stats.lookup_tokens > stats.lookup_rounds > 0
    assert stats.as_dict()["block_size"] == "auto" and sum(stats.blocks.values()) == stats.rounds
    assert generate(target_only, ids, 80, lookup=False)[1].as_dict()["block_size"] == 1  # plain, as before


def test_drafter_false_uses_lookup_drafts_only(llama, monkeypatch):
    ids = llama.tokenizer.encode(REPETITIVE)
    plain = generate(llama, ids, 60, block_size=1)[0]
    # The drafter's round costs would be worth taking: only drafter=False keeps it out.
    fixed_costs(monkeypatch, llama, drafting=0.0)

    def no_drafter(*args, **kwargs):
        raise AssertionError("the drafter ran")
    monkeypatch.setattr(llama, "draft", no_drafter)
    monkeypatch.setattr(llama, "project_context", no_drafter)
    got, stats = generate(llama, ids, 60, drafter=False)
    assert got == plain and stats.lookup_tokens > stats.lookup_rounds > 0
