"""Choosing the block size each round: draft only as far as it pays.

A round with block b costs verify(b) + draft(b) and yields 1 + a_1 + a_1 a_2 + ... tokens, where a_j is
the chance that draft j is accepted given that the ones before it were. Both sides are measured: the
costs once per loaded model (a few timed passes at start-up), the a_j as the generation goes (decayed
counts, so a switch from code to prose is followed). Each round takes the b with the most tokens per
unit of cost; b = 1 is plain decoding, so a drafter that does not pay costs little more than nothing.
"""
from __future__ import annotations

import time

import numpy as np

from .model import ExportedModel

MEASURED_BLOCKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def filled_cache(model: ExportedModel, context: int):
    """A target cache holding `context` filler tokens (which ones does not change a cost), and their taps
    as project_context takes them: [(taps, length)] per prefill piece, empty without a drafter.

    Filled through model.prefill, in the pieces the provider bounds a call to: one call with the whole
    context would fall outside TensorRT's shape profiles and make it rebuild its engine."""
    cache = model.new_target_cache()
    _, pieces = model.prefill([1] * context, cache, taps=model.has_drafter)
    return cache, pieces


def run_times(fn, repeats: int) -> list[float]:
    """Seconds each of `repeats` calls of fn took."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure_costs(model: ExportedModel, context: int = 64, repeats: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Cost of a round with block b in plain decode steps, for b = 0..model.verify_limit: verifying b
    tokens alone (a round of prompt-lookup drafts), and verifying b tokens plus drafting b - 1 (a
    drafter's round; the same without a drafter).

    Measured at the sizes above and interpolated between them; a few hundred milliseconds at start-up.
    """
    top = model.verify_limit
    drafting = model.has_drafter
    cache, pieces = filled_cache(model, context)
    if drafting:
        draft_cache = model.new_draft_cache()
        model.project_context(pieces, draft_cache)

    def best_of(fn) -> float:
        return min(run_times(fn, repeats))  # the least disturbed run: costs are compared, noise only blurs them

    sizes = [b for b in MEASURED_BLOCKS if b < top] + [top]
    verify, draft = {}, {}
    for b in sizes:
        # A drafting round's verify also returns its taps, for the next round's context.
        verify[b] = best_of(lambda: model.run_target([1] * b, cache, last_only=False, taps=drafting and b > 1))
        draft[b] = best_of(lambda: model.draft(1, context, b, draft_cache)) if drafting and b > 1 else 0.0

    def in_steps(seconds: dict) -> np.ndarray:
        costs = np.interp(np.arange(top + 1), sizes, [seconds[b] / verify[1] for b in sizes])
        costs[0] = np.inf
        return costs

    return in_steps(verify), in_steps({b: verify[b] + draft[b] for b in sizes})


class BlockPolicy:
    """Per-round block size from measured costs and running acceptance estimates."""

    DECAY = 0.95       # every drafting round, older observations weigh this much less
    FIRST_PRIOR = 0.5  # acceptance assumed for draft 1 before any data: a coin flip
    PRIOR_WEIGHT = 1.0 # pseudo-observations behind each prior
    PROBE_EVERY = 16   # while decoding plainly, draft one token at most every this many rounds to keep watching,
    PROBE_BUDGET = 0.02  # and no more often than keeps the probes' extra cost under this share of the time
    TIMING_WEIGHT = 0.1  # weight of the newest round in the running round-time averages
    RETIME_EVERY = 64    # while drafting, decode one round plainly at least this often to keep the step time fresh

    def __init__(self, costs: np.ndarray):
        self.costs = costs
        drafts = len(costs) - 2  # the largest block drafts this many tokens
        self.accepted = np.zeros(drafts)  # index j - 1 for draft position j
        self.tested = np.zeros(drafts)
        self.plain_rounds = 0
        # A probe is a block-2 round instead of a plain one. Where verifying two tokens costs nearly two
        # steps (int4 MatMulNBits on this CPU) probing every 16 rounds alone would cost 7 %.
        self.probe_every = max(self.PROBE_EVERY, int(np.ceil((costs[2] - 1.0) / self.PROBE_BUDGET)))
        # Drafting rounds in a real generation cost more than their start-up measurement says (the target's
        # threads, idle while the drafter runs, have to wake up again; caches are colder): this factor,
        # learnt from the rounds' own times, scales the cost of every block above 1.
        self.step_s = None
        self.drafting_factor = 1.0
        self.timed = False  # whether rounds report their times (generate() does; simulations may not)
        self.since_plain = 0

    def rates(self) -> list[float]:
        """Chance that draft j is accepted given drafts 1..j-1 were, j = 1..B-1.

        A position with little data leans on the one before it: if drafts 1..7 always land, draft 8
        probably does too, and trying a longer block is how to find out.
        """
        rates, prior = [], self.FIRST_PRIOR
        for acc, tested in zip(self.accepted, self.tested):
            prior = (acc + self.PRIOR_WEIGHT * prior) / (tested + self.PRIOR_WEIGHT)
            rates.append(prior)
        return rates

    def tokens_per_cost(self, limit: int | None = None) -> np.ndarray:
        """Expected tokens per unit of cost of a round with block b, for b = 1..limit (default: all)."""
        expected = 1.0 + np.concatenate([[0.0], np.cumsum(np.cumprod(self.rates()))])  # tokens, b = 1..B
        costs = self.costs[1:].copy()
        costs[1:] *= self.drafting_factor
        return (expected / costs)[:limit]

    def choose(self, limit: int | None = None) -> int:
        """The block for the next round, at most `limit` (a prompt-lookup proposal's length + 1)."""
        block = int(np.argmax(self.tokens_per_cost(limit))) + 1
        if block > 1 and self.timed and (self.step_s is None or self.since_plain >= self.RETIME_EVERY):
            block = 1  # time a plain step: the yardstick for the drafting rounds' times
        if block == 1:
            self.plain_rounds += 1
            if self.plain_rounds % self.probe_every == 0:
                return 2
        return block

    def update(self, block: int, accepted: int, seconds: float | None = None) -> None:
        """After a round of `block` tokens of which `accepted` drafts were kept, that took `seconds`
        (drafting and verifying)."""
        self.since_plain = 0 if block == 1 else self.since_plain + 1
        if seconds is not None:
            self.timed = True
            self._time(block, seconds)
        if block == 1:
            return  # nothing drafted, nothing learnt
        # Every position forgets a little each drafting round, so one not reached lately drifts back to
        # its prior instead of keeping the optimism of an easier stretch of text.
        self.accepted *= self.DECAY
        self.tested *= self.DECAY
        seen = min(accepted + 1, block - 1)  # drafts 1..seen were checked; the first rejected one counts
        self.tested[:seen] += 1
        self.accepted[:accepted] += 1

    def _time(self, block: int, seconds: float) -> None:
        w = self.TIMING_WEIGHT
        if block == 1:
            self.step_s = seconds if self.step_s is None else (1 - w) * self.step_s + w * seconds
        elif self.step_s is not None:
            observed = seconds / self.step_s / self.costs[block]
            self.drafting_factor = float(np.clip((1 - w) * self.drafting_factor + w * observed, 0.5, 3.0))
