"""Choosing the target's token at a position: argmax at temperature 0, otherwise a sample.

DFlash stays lossless when sampling because the target samples every verify position and a draft is
kept only while it equals the target's sample there: each kept token is then exactly the token plain
sampling would have drawn after the same prefix. The random number for a position comes from (seed,
position) alone, so plain decoding and DFlash with the same seed draw the same number for the same
position and, given the same logits, the same token.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: no limit
    top_p: float = 1.0        # nucleus: the smallest set of tokens whose probabilities reach top_p
    seed: int | None = None   # None: a fresh seed per generation

    def check(self) -> "Sampling":
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"temperature must be 0 (greedy) or a finite positive number, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be 0 (no limit) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UserError(f"seed must be in 0..2**63-1, got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, sampling: Sampling):
        self.sampling = sampling.check()
        self.seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)

    def probabilities(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids in increasing order, their probabilities) after temperature, top-k and top-p."""
        s = self.sampling
        x = logits.astype(np.float64) / s.temperature
        ids = np.arange(len(x))
        if 0 < s.top_k < len(x):
            ids = np.sort(np.argpartition(-x, s.top_k - 1)[: s.top_k])
        p = np.exp(x[ids] - x[ids].max())
        p /= p.sum()
        if s.top_p < 1:
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), s.top_p)) + 1]
            keep.sort()
            ids, p = ids[keep], p[keep] / p[keep].sum()
        return ids, p

    def choose(self, logits: np.ndarray, position: int) -> int:
        """The token at absolute sequence position `position`, given its logits row."""
        if self.sampling.greedy:
            return int(np.argmax(logits))
        ids, p = self.probabilities(logits)
        u = np.random.default_rng([self.seed, position]).random()
        return int(ids[min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(ids) - 1)])
