"""Test helpers that make drafts land, and that take timing out of the per-round choice.

A tiny random drafter's drafts are almost never accepted, so a test that runs it checks only row 0 of each
verify: the rows after it, where positions, cuts and cache lengths go wrong, are never committed. The
rewrite hook keeps the real drafter path (projection, draft call, device taps) and swaps its proposals for
a known continuation afterwards. The per-round choice between the drafter, prompt lookup and plain steps
depends on costs timed at start-up (policy.measure_costs); on a busy machine a disturbed timing can make
copied drafts look unprofitable, so tests that need lookup rounds fix the costs instead.
"""
import random

import numpy as np

from dflash_edge.runtime.generate import generate


def rewriter(model, reference, wrong=0.25, seed=0):
    """A rewrite_drafts hook: after the real drafter ran, its proposals become `reference`'s continuation of
    the reply so far, each wrong with probability `wrong` (a wrong one is the true token + 1)."""
    rng = random.Random(seed)
    vocab = model.manifest["target"]["vocab_size"]

    def rewrite(out, drafts):
        truth = reference[len(out):len(out) + len(drafts)]
        truth += [0] * (len(drafts) - len(truth))
        return [t if rng.random() >= wrong else (t + 1) % vocab for t in truth]
    return rewrite


def multi_token_rounds(stats, least=3):
    """Rounds that committed `least` tokens or more: proof that verifies' later rows were used."""
    return sum(count for tokens, count in stats.acceptance.items() if tokens >= least)


def accepted_drafts(stats):
    """Draft tokens kept over the generation: each round commits its accepted drafts plus one token of the
    target's own, unless a stop or max_new_tokens cut it (then this undercounts, never overcounts)."""
    return sum((tokens - 1) * count for tokens, count in stats.acceptance.items())


def accepting(model, ids, plain, block, wrong=0.25, seed=0):
    """DFlash through the real drafter path, its drafts rewritten to plain decoding's continuation (each wrong
    with probability `wrong`), so verifies commit their later rows too. Returns (tokens, rounds that
    committed 3 or more tokens)."""
    got, stats = generate(model, ids, len(plain), block_size=block,
                          rewrite_drafts=rewriter(model, plain, wrong, seed))
    return got, multi_token_rounds(stats)


def cost_tables(model, verify_step=0.05, drafting=50.0):
    """(verify costs, drafter round costs) as policy.measure_costs returns them, for block 0..verify_limit:
    verifying b tokens costs 1 + verify_step * (b - 1) plain steps, and a drafter round `drafting` more."""
    verify = 1.0 + verify_step * (np.arange(model.verify_limit + 1) - 1.0)
    verify[0] = np.inf
    rounds = verify + drafting
    rounds[:2] = verify[:2]  # a block of 1 drafts nothing: a plain step
    return verify, rounds


def fixed_costs(monkeypatch, model, verify_step=0.05, drafting=50.0):
    """Replace the costs measured at start-up by fixed ones (cost_tables), so which rounds use prompt lookup
    follows from the tokens alone. With the default the drafter never pays (no drafter rounds, hence no
    round timings either) and copied drafts are verified wherever they promise more than a plain step."""
    verify, rounds = cost_tables(model, verify_step, drafting)
    monkeypatch.setattr(model, "verify_costs", lambda: verify.copy())
    monkeypatch.setattr(model, "round_costs", lambda: rounds.copy())


def rounds_emitted(model, ids, max_new, **kwargs):
    """(tokens, stats, the tokens each round emitted), the list opening with prefill's single token."""
    emitted = []
    got, stats = generate(model, ids, max_new, on_tokens=lambda new: emitted.append(list(new)), **kwargs)
    return got, stats, emitted


def record_verifies(monkeypatch, model):
    """A list that fills with (position of the first token, token ids) of each verify call, prefill's
    calls left out. The first token is the last one committed; the rest are the round's drafts."""
    verifies = []
    original = model.run_target

    def spy(ids, cache, last_only, **kwargs):
        if not last_only:
            verifies.append((cache.length, list(ids)))
        return original(ids, cache, last_only, **kwargs)
    monkeypatch.setattr(model, "run_target", spy)
    return verifies

