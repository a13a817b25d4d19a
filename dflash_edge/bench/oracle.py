"""Oracle drafts: measure the runtime at a chosen acceptance length, whatever the drafter's quality.

The real drafter still runs every round (its cost is paid); its proposals are then replaced by the
continuation plain decoding produced, broken on purpose after k tokens. k is drawn each round so that
its mean is tau - 1 (the bonus token makes up the rest): floor(tau - 1) or one more, with the probability
that gives the right mean. The output stays exactly the plain output, so exactness is still checked.
"""
from __future__ import annotations

import math
import random


class OracleDrafts:
    def __init__(self, reference: list[int], tau: float, vocab_size: int, seed: int = 0):
        if tau < 1:
            raise ValueError("tau is at least 1 (the bonus token)")
        self.reference = reference
        self.accept = tau - 1.0
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)

    def __call__(self, generated: list[int], drafts: list[int]) -> list[int]:
        n = len(drafts)
        base = math.floor(self.accept)
        k = min(n, base + (self.rng.random() < self.accept - base))
        upcoming = self.reference[len(generated):len(generated) + n]
        proposal = upcoming[:k]
        # The first proposal after the agreed ones is wrong on purpose; the rest do not matter.
        wrong = [(t + 1) % self.vocab_size for t in upcoming[k:]]
        proposal += wrong + drafts[len(proposal) + len(wrong):]
        return proposal[:n]
