"""ONNX Runtime sessions, and one shared copy of the vocab matrices for all of them."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..manifest import inside
from .providers import GPU, check_started, ort, preload_gpu_libraries, warn_placement

class SharedWeights:
    """The embedding table / LM head, memory-mapped once and handed to every session that uses them."""

    def __init__(self, folder: Path, index: dict | None):
        self.values: dict[str, ort.OrtValue] = {}
        self.users: dict[str, list[str]] = {}
        self._arrays = []  # keep the mapped buffers alive as long as the sessions
        if not index:
            return
        # Mapped straight into the graphs, past ORT's own external-data checks: so the file must be in the
        # folder, and each entry must describe bytes that lie inside it.
        path = inside(folder, index.get("file"))
        size = path.stat().st_size
        for name, t in index["tensors"].items():
            dtype, shape = _check_tensor(path, size, name, t)
            arr = np.memmap(path, dtype=dtype, mode="r", offset=t["offset"], shape=(int(np.prod(shape)),))
            arr = arr.reshape(shape)
            self._arrays.append(arr)
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
            self.users[name] = t["graphs"]

    def for_graph(self, graph: str) -> dict[str, ort.OrtValue]:
        return {n: v for n, v in self.values.items() if graph in self.users[n]}


def _check_tensor(path: Path, size: int, name: str, t) -> tuple[np.dtype, list[int]]:
    """One shared-weights index entry, checked: a bad one is a one-line UserError, not a numpy traceback."""
    def bad(why: str):
        return UserError(f"{path.name}: the entry for {name!r} {why}; export the model again")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(t, dict):
        raise bad("is not an object")
    try:  # a name, not None: np.dtype(None) is float64
        dtype = np.dtype(t["dtype"]) if isinstance(t.get("dtype"), str) else None
    except TypeError:
        dtype = None
    # Numbers only: no objects, strings or records (bfloat16 is ml_dtypes' record type, where it is loaded).
    if dtype is None or (dtype.kind not in "fiu" and dtype.name != "bfloat16"):
        raise bad(f"has dtype {t.get('dtype')!r}, not a numeric type")
    shape = t.get("shape")
    if not (isinstance(shape, list) and all(count(d) for d in shape)):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    offset, length = t.get("offset"), t.get("length")
    if not (count(offset) and count(length)):
        raise bad("needs a non-negative integer offset and length")
    if np.prod(shape, dtype=object) * dtype.itemsize != length:  # object: no overflow on huge shapes
        raise bad(f"says {length} bytes, but {shape} {dtype.name} is a different size")
    if offset + length > size:
        raise UserError(f"{path} is truncated; export the model again")
    if not (isinstance(t.get("graphs"), list) and all(isinstance(g, str) for g in t["graphs"])):
        raise bad("must list the graphs that use it")
    return dtype, shape


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
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted in GPU:
        preload_gpu_libraries()  # before the session: the CUDA provider resolves its libraries when it loads
    options = session_options(path, wanted, shared, threads, prepack, spin)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises several types for unreadable or corrupted graphs
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {path.name}: {msg}; the file may be truncated, export again") from None
    check_started(session, wanted, fallback, path.name)
    if wanted in GPU and session.get_providers()[0] == wanted:
        warn_placement(session, wanted, path.name)
    return session


GPU_THREADS = 2  # intra-op threads of a GPU session: only shape arithmetic and the odd small node run there


def session_options(path: Path, wanted: str, shared: SharedWeights | None = None, threads: int | None = None,
                    prepack: bool = True, spin: bool = True) -> ort.SessionOptions:
    """The SessionOptions make_session creates `path`'s session with, `wanted` being the provider asked for.

    On a GPU provider the CPU runs only shape arithmetic, so the session gets at most GPU_THREADS threads
    and no spinning (review F17): a pool of every core, spinning between calls, buys nothing there and on
    a Jetson takes power from the GPU. Its initializers go straight to the device allocator, not into the
    arena, which would round them up with the rest (review F18)."""
    gpu = wanted in GPU
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own placement warnings stay hidden; warn_placement says what matters
    if gpu:
        threads, spin = min(threads or GPU_THREADS, GPU_THREADS), False
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
    # One mapped copy for every session is a host-memory saving; a GPU session uploads its initializers to
    # its own device buffer (TensorRT builds them into its engine) whatever it is handed, so there the graph
    # reads the shared file as ordinary external data (review F11).
    if shared and not gpu:
        for name, value in shared.for_graph(path.name).items():
            options.add_initializer(name, value)
    if gpu:  # which provider got which node (ORT 1.24+; older versions ignore the entry)
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    return options


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
