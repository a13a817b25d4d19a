"""The decode loop: DFlash draft-and-verify, with plain decoding as the same loop at block size 1.

    prefill -> [draft B-1 tokens in one drafter pass -> verify the block in one target pass ->
    keep the longest agreeing prefix + the target's own next token -> cut the target cache back to
    what was kept -> project the kept tokens' features into the draft cache] -> repeat

With the per-round choice (block size None) a round may instead verify drafts copied from earlier in the
context (lookup.py), which skip the drafter pass; the verify treats them like the drafter's.

At temperature 0 every emitted token is the target's argmax given the true prefix, so the output equals
plain greedy decoding of the same graph token for token. Above it the target samples each verify
position and drafts are kept while they equal those samples (sampling.py): the output is distributed
exactly as plain sampling's.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from .lookup import PromptLookup
from .model import ExportedModel, TargetStep
from .policy import BlockPolicy
from .sampling import Sampler, Sampling

# A drafter hook for tests and benchmarks: (committed ids so far, block size) -> B-1 proposed ids.
DraftFn = Callable[[list[int], int], list[int]]
# A benchmark hook that runs after the real drafter (its cost is paid): (generated ids so far, the drafter's
# proposals) -> the proposals to verify. dflash-bench --oracle-tau uses it.
RewriteFn = Callable[[list[int], list[int]], list[int]]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    block_size: int = 1
    acceptance: Counter = field(default_factory=Counter)  # tokens committed per round -> count
    blocks: Counter = field(default_factory=Counter)      # block size chosen per round -> count (adaptive)
    lookup_rounds: int = 0                                # rounds that verified prompt-lookup drafts
    lookup_tokens: int = 0                                # tokens those rounds committed
    ttft_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    finish_reason: str = ""

    @property
    def tau(self) -> float:
        """Mean tokens committed per verify round (accepted drafts + the bonus token)."""
        return sum(k * v for k, v in self.acceptance.items()) / self.rounds if self.rounds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill; decode speed counts the ones after it.
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "finish_reason": self.finish_reason,
            "ttft_s": round(self.ttft_s, 4),
            "decode_s": round(self.decode_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "block_size": self.block_size or "auto",
            "block_histogram": {str(k): self.blocks[k] for k in sorted(self.blocks)},
            "rounds": self.rounds,
            "tau": round(self.tau, 3),
            "acceptance_histogram": {str(k): self.acceptance[k] for k in sorted(self.acceptance)},
            "lookup_rounds": self.lookup_rounds,
            "lookup_tokens": self.lookup_tokens,
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "other_s": round(max(0.0, self.decode_s - self.draft_s - self.verify_s), 4),
        }


def check_request(model: ExportedModel, prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise UserError("the prompt is empty")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(prompt_ids) >= model.max_context:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {model.max_context}")


def generate(model: ExportedModel, prompt_ids: list[int], max_new_tokens: int,
             block_size: int | None = None, on_tokens: Callable[[list[int]], None] | None = None,
             draft_fn: DraftFn | None = None, rewrite_drafts: RewriteFn | None = None,
             sampling: Sampling | None = None, lookup: bool = True, drafter: bool = True,
             cancel: threading.Event | None = None) -> tuple[list[int], GenerationStats]:
    """block_size 1 is plain decoding, N > 1 drafts N - 1 tokens every round, and None picks the size
    each round (up to the drafter's trained size) from measured costs and acceptance. With None, rounds
    may also verify prompt-lookup drafts (lookup.py) instead of the drafter's, where their running
    acceptance says they pay more (lookup=False: never; drafter=False, or a folder without a drafter:
    lookup drafts or plain decoding only). sampling: greedy when None. cancel: set it from another
    thread to stop after the current round (finish reason "cancelled"; the tokens emitted so far are
    returned)."""
    sampler = Sampler(sampling or Sampling())
    check_request(model, prompt_ids, max_new_tokens)
    policy = lookup_policy = finder = None
    if block_size is None and draft_fn is None:
        if model.has_drafter and drafter:
            policy = BlockPolicy(model.round_costs())
        else:
            block_size = 1  # the rounds without lookup drafts decode plainly
        if lookup:
            lookup_policy, finder = BlockPolicy(model.verify_costs()), PromptLookup(prompt_ids)
    block_size = model.check_block_size(block_size) if draft_fn is None else block_size
    # Never run past the context: the last position written is prompt + new - 1.
    max_new_tokens = min(max_new_tokens, model.max_context - len(prompt_ids))
    adaptive = policy is not None or finder is not None
    stats = GenerationStats(prompt_tokens=len(prompt_ids), block_size=0 if adaptive else block_size)
    emit = on_tokens or (lambda ids: None)
    stops = model.stop_token_ids
    use_drafter = block_size > 1 and draft_fn is None

    t0 = time.perf_counter()
    # The caches grow as they fill (on a device in large steps, cache.KVCache); the prompt and, on a device,
    # one round's verify (at most `top` positions past the last kept one) are reserved now.
    top = model.verify_limit if adaptive else block_size
    room = len(prompt_ids) + (0 if model.on_host else top)
    cache = model.new_target_cache(room)
    greedy = sampler.sampling.greedy

    def target_choice(step: TargetStep, row: int, position: int) -> int:
        """The target's token at `position`, row `row` of its call: the graph's argmax, or a sample."""
        return int(step.next_ids[row]) if greedy else sampler.choose(step.logits[row], position)

    first, pending = model.prefill(prompt_ids, cache, logits=not greedy, taps=use_drafter)
    token = target_choice(first, -1, len(prompt_ids))
    out = [token]
    if finder:
        finder.extend(out)
    stats.ttft_s = time.perf_counter() - t0
    emit([token])

    # pending: (taps, kept rows) of committed tokens not yet in the draft cache.
    draft_cache = model.new_draft_cache(room) if use_drafter else None
    start = len(prompt_ids)   # position of `token`, which the target has not seen yet
    finish = "stop" if token in stops else ""
    t_decode = time.perf_counter()
    while not finish and len(out) < max_new_tokens:
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        t_round = time.perf_counter()
        left = max_new_tokens - len(out) + 1  # never draft past max_new_tokens
        proposal = finder.propose(min(top, left) - 1) if finder else []
        looked_up = False
        if proposal:
            block = lookup_policy.choose(limit=len(proposal) + 1)
            # Copied drafts cost no drafter pass; take them where they promise more tokens per unit of
            # cost than the drafter's best block.
            drafter_best = policy.tokens_per_cost().max() if policy else 1.0  # 1.0: a plain step
            looked_up = block > 1 and lookup_policy.tokens_per_cost(block)[-1] >= drafter_best
        if looked_up:
            drafts = proposal[:block - 1]
        else:
            chosen = policy.choose() if policy else block_size
            block = min(chosen, left)
            drafts = []
        if block > 1 and not looked_up:
            t = time.perf_counter()
            if use_drafter:
                # Projection waits for a round that drafts: plain rounds skip the drafter entirely.
                model.project_context(pending, draft_cache)
                pending = []
                drafts = model.draft(token, start, block, draft_cache)
                if rewrite_drafts is not None:
                    drafts = rewrite_drafts(out, drafts)
            else:
                drafts = list(draft_fn(list(prompt_ids) + out, block))[: block - 1]
            stats.draft_s += time.perf_counter() - t

        t = time.perf_counter()
        step = model.run_target([token] + drafts, cache, last_only=False, logits=not greedy, taps=use_drafter)
        stats.verify_s += time.perf_counter() - t
        # Row i is the target's choice for position start + 1 + i: keep drafts while they equal it; its
        # choice at the first disagreement is the bonus token.
        accepted = 0
        bonus = target_choice(step, 0, start + 1)
        while accepted < len(drafts) and drafts[accepted] == bonus:
            accepted += 1
            bonus = target_choice(step, accepted, start + 1 + accepted)
        new = drafts[:accepted] + [bonus]
        # The target cache keeps [token] + accepted drafts; the bonus token is fed next round.
        cache.commit(accepted + 1)
        if use_drafter:
            pending.append((step.taps, accepted + 1))
        start += accepted + 1
        if looked_up:
            lookup_policy.update(block, accepted)
        elif policy:
            policy.update(block, accepted, time.perf_counter() - t_round)
        if adaptive:
            stats.blocks[block] += 1
        token = new[-1]

        new = new[: max_new_tokens - len(out)]
        for i, t_id in enumerate(new):
            if t_id in stops:
                new, finish = new[: i + 1], "stop"
                break
        stats.rounds += 1
        stats.acceptance[len(new)] += 1
        if looked_up:
            stats.lookup_rounds += 1
            stats.lookup_tokens += len(new)
        out += new
        if finder:
            finder.extend(new)
        emit(new)

    stats.decode_s = time.perf_counter() - t_decode
    stats.new_tokens = len(out)
    stats.finish_reason = finish or "length"
    return out, stats
