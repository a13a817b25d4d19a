"""ONNX Runtime sessions, and one shared copy of the vocab matrices for all of them."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import UserError
from .providers import check_started

class SharedWeights:
    """The embedding table / LM head, memory-mapped once and handed to every session that uses them."""

    def __init__(self, folder: Path, index: dict | None):
        self.values: dict[str, ort.OrtValue] = {}
        self.users: dict[str, list[str]] = {}
        self._arrays = []  # keep the mapped buffers alive as long as the sessions
        if not index:
            return
        path = folder / index["file"]
        for name, t in index["tensors"].items():
            count = int(np.prod(t["shape"]))
            if path.stat().st_size < t["offset"] + t["length"]:
                raise UserError(f"{path} is truncated; export the model again")
            arr = np.memmap(path, dtype=np.dtype(t["dtype"]), mode="r", offset=t["offset"], shape=(count,))
            arr = arr.reshape(t["shape"])
            self._arrays.append(arr)
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
            self.users[name] = t["graphs"]

    def for_graph(self, graph: str) -> dict[str, ort.OrtValue]:
        return {n: v for n, v in self.values.items() if graph in self.users[n]}


def make_session(path: Path, providers: list, shared: SharedWeights | None = None,
                 threads: int | None = None, prepack: bool = True, spin: bool = True,
                 fallback: bool = False) -> ort.InferenceSession:
    """providers: names or (name, options) pairs, the first one wanted (see providers.py).

    spin=False for sessions that run between calls of a spinning one (the drafter between verifies).

    The target's pool spins after each call, and the next verify comes within milliseconds, so spinning
    saves it the wake-up (15.5 vs 18.7 ms a decode step, 2 cores). A drafter pool that spun too would
    fight the target's for the cores (a round took twice as long); one that sleeps costs the drafter a
    wake-up, which is less. (ORT's process-wide thread pool would do as well, but it forbids per-session
    pools to every other ORT user in the process, an app's own models included.)
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # ORT's CPU and CUDA providers fuse a block-quantized DequantizeLinear + MatMul (the tensorrt variant's
    # int4) into MatMulNBits, by default with int8 activations: one scale per block of tokens would make
    # a token's logits depend on the tokens verified with it. Level 1 keeps the activations in fp32.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if not prepack:
        # Prepacking copies each weight into a packed layout per session; a shared weight then exists twice.
        options.add_session_config_entry("session.disable_prepacking", "1")
    if shared:
        for name, value in shared.for_graph(path.name).items():
            options.add_initializer(name, value)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises several types for unreadable or corrupted graphs
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {path.name}: {msg}; the file may be truncated, export again") from None
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    check_started(session, wanted, fallback, path.name)
    return session


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
