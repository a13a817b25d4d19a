"""Tap features of training sequences, computed once by the frozen target and cached on disk.

Stored as one fp16 memmap ([total_tokens, n_taps*H]) plus an offsets index; taps reach |x| ~ 25,000,
inside fp16's range, and the drafter's fc sees them in fp32. The same pass keeps the target's greedy
choice after every position (int32, [total_tokens]), the labels of dflash-train --labels target, and
with top_k its top_k likeliest tokens there and their probabilities (int32 + fp16, [total_tokens, top_k]),
the soft targets of --soft-targets.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import replace_durably, write_text_atomic
from .data import Sequence


class FeatureStore:
    def __init__(self, folder: Path):
        self.folder = folder
        meta = json.loads((folder / "features.json").read_text())
        self.offsets = meta["offsets"]
        self.width = meta["width"]
        total = self.offsets[-1]
        self.data = np.memmap(folder / "features.f16", dtype=np.float16, mode="r", shape=(total, self.width))
        greedy = folder / "greedy.i32"  # absent from caches written before it existed
        self.choices = np.memmap(greedy, dtype=np.int32, mode="r", shape=(total,)) if greedy.is_file() else None
        self.top_k = meta.get("top_k", 0)
        if self.top_k:
            shape = (total, self.top_k)
            self.top_ids = np.memmap(folder / "topk_ids.i32", dtype=np.int32, mode="r", shape=shape)
            self.top_probs = np.memmap(folder / "topk_probs.f16", dtype=np.float16, mode="r", shape=shape)

    def __getitem__(self, i: int) -> torch.Tensor:
        a, b = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(np.asarray(self.data[a:b], dtype=np.float32))

    @property
    def has_greedy(self) -> bool:
        return self.choices is not None

    def greedy(self, i: int) -> torch.Tensor:
        """Sequence i's target choices: [j] is the target's argmax after tokens 0..j."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(np.asarray(self.choices[a:b], dtype=np.int64))

    def soft(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's soft targets: the target's top_k ids [len, k] after each position, and their
        probabilities [len, k]."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return (torch.from_numpy(np.asarray(self.top_ids[a:b], dtype=np.int64)),
                torch.from_numpy(np.asarray(self.top_probs[a:b], dtype=np.float32)))

    @staticmethod
    def exists(folder: Path) -> bool:
        """A complete cache: features.json (written last) parses, and the files it describes are there at
        the sizes it implies. Anything less (a torn write, a cache from an interrupted run) counts as
        absent, so the features are computed again rather than a rerun failing on them."""
        try:
            meta = json.loads((folder / "features.json").read_text())
            offsets, width, top_k = meta["offsets"], meta["width"], meta.get("top_k", 0)
            total = offsets[-1]
            if not (isinstance(total, int) and isinstance(width, int) and isinstance(top_k, int) and top_k >= 0):
                return False
            sizes = {"features.f16": total * width * 2}
            if (folder / "greedy.i32").exists():
                sizes["greedy.i32"] = total * 4
            if top_k:
                sizes.update({"topk_ids.i32": total * top_k * 4, "topk_probs.f16": total * top_k * 2})
            return all((folder / name).stat().st_size == size for name, size in sizes.items())
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return False


@torch.no_grad()
def compute_features(target, seqs: list[Sequence], folder: Path, device: str, log=print,
                     batch_tokens: int = 4096, top_k: int = 0) -> FeatureStore:
    """Run the target module (export/modeling.TargetModel) over every sequence; write the store."""
    width = len(target.tap_layer_ids) * target.spec.hidden_size
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s.tokens))
    # An older index must not describe the files this pass is about to replace.
    (folder / "features.json").unlink(missing_ok=True)
    tmp, tmp_greedy = folder / "features.f16.tmp", folder / "greedy.i32.tmp"
    data = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(offsets[-1], width))
    choices = np.memmap(tmp_greedy, dtype=np.int32, mode="w+", shape=(offsets[-1],))
    if top_k:
        tmp_ids, tmp_probs = folder / "topk_ids.i32.tmp", folder / "topk_probs.f16.tmp"
        top_ids = np.memmap(tmp_ids, dtype=np.int32, mode="w+", shape=(offsets[-1], top_k))
        top_probs = np.memmap(tmp_probs, dtype=np.float16, mode="w+", shape=(offsets[-1], top_k))
    t0 = time.perf_counter()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens))
    i = 0
    while i < len(order):
        # Batch sequences of similar length up to batch_tokens, right-padded (causal: padding is harmless).
        batch = [order[i]]
        while (i + len(batch) < len(order)
               and (len(batch) + 1) * len(seqs[order[i + len(batch)]].tokens) <= batch_tokens):
            batch.append(order[i + len(batch)])
        width_now = max(len(seqs[j].tokens) for j in batch)
        ids = torch.zeros(len(batch), width_now, dtype=torch.long)
        for r, j in enumerate(batch):
            ids[r, :len(seqs[j].tokens)] = torch.tensor(seqs[j].tokens)
        empty = target.empty_cache(len(batch), device)
        pos = torch.arange(width_now)[None].expand(len(batch), -1)
        # The target runs in its own dtype (bf16 with dflash-train --precision bf16).
        out = target(ids.to(device), pos.to(device), torch.ones_like(ids).to(device),
                     torch.arange(width_now, device=device), *empty, argmax=True, top_k=top_k)
        greedy, taps = out[0].int().cpu().numpy(), out[3 if top_k else 1]
        if top_k:
            ids_k, probs_k = out[1].int().cpu().numpy(), out[2].float().cpu().numpy().astype(np.float16)
        taps = taps.float().clamp(-65000, 65000).cpu().numpy().astype(np.float16)
        for r, j in enumerate(batch):
            n = len(seqs[j].tokens)
            data[offsets[j]:offsets[j] + n] = taps[r, :n]
            choices[offsets[j]:offsets[j] + n] = greedy[r, :n]
            if top_k:
                top_ids[offsets[j]:offsets[j] + n] = ids_k[r, :n]
                top_probs[offsets[j]:offsets[j] + n] = probs_k[r, :n]
        i += len(batch)
        if i == len(order) or i % 64 < len(batch):
            rate = offsets[-1] * i / len(order) / (time.perf_counter() - t0)
            log(f"  features {i}/{len(order)} sequences, ~{rate:.0f} tok/s")
    data.flush()
    choices.flush()
    del data, choices
    if top_k:
        top_ids.flush()
        top_probs.flush()
        del top_ids, top_probs
        replace_durably(tmp_ids, folder / "topk_ids.i32")
        replace_durably(tmp_probs, folder / "topk_probs.f16")
    replace_durably(tmp_greedy, folder / "greedy.i32")
    replace_durably(tmp, folder / "features.f16")
    # The index goes last: while it is missing or torn, exists() treats the cache as absent.
    write_text_atomic(folder / "features.json", json.dumps({"offsets": offsets, "width": width, "top_k": top_k}))
    return FeatureStore(folder)
