"""What an export will need, estimated from the config before anything is loaded, and the refusal when the
machine does not have it.

The constants are measured (BENCHMARKS.md, "Export memory"): loading through transformers costs about
11 bytes per parameter (the fp32 model, our copy, the cast, the trace); streaming costs a fixed base plus a
few copies of the largest tensor, and its validation rebuilds only the first layers.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .devices import Shape  # noqa: F401  (the decoder sizes the estimates read; re-exported)

GB = 1e9
LOADED_BYTES_PER_PARAM = 11.0   # the transformers path, measured on a 1.07 B Llama (11.6 GB)
STREAM_BASE = 1.2 * GB          # Python, torch, onnx, the traced graph
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Packed bytes per weight of a quantized product, with its fp32 (or fp16) block scales (blocks of 32).
QUANT_BYTES = {"int4": 0.5 + 4 / 32, "int8": 1 + 4 / 32, "int8-tokens": 1 + 0.0}


@dataclass
class Estimate:
    memory: float        # peak resident bytes
    disk: float          # bytes written
    how: str             # what dominates, for the message


def estimate(shape: Shape, dtype: str, quantize: str | None, streamed: bool, validate_layers: int,
             drafter_params: int = 0, drafter_checked: int = 0) -> Estimate:
    """validate_layers: 0 when the whole model is validated in memory, else how many first layers are.
    drafter_params: the drafter's own; drafter_checked: how many of them its validation holds in memory
    (all of them for a small drafter, its first layer for a large one)."""
    per_weight = QUANT_BYTES[quantize] if quantize else WEIGHT_BYTES[dtype]
    # The embedding and LM head stay in the export dtype (fp32 for the quantized ONNX Runtime kinds); a
    # drafter gets its own copy of them in the shared file, the one the runtime maps.
    vocab_bytes = shape.vocab_params() * (WEIGHT_BYTES[dtype] if dtype != "fp32" or not quantize else 4)
    disk = (shape.layers * shape.layer_params() * per_weight + vocab_bytes
            + (drafter_params * WEIGHT_BYTES[dtype] + vocab_bytes if drafter_params else 0))
    # The drafter streams like the target; its check holds the checked part three times in fp32 (our module,
    # its cast, the graph) and, checked whole, the vocabulary matrices in fp32.
    drafter = (STREAM_BASE + drafter_checked * 4 * 3 + shape.vocab_params() * 4 * (drafter_checked == drafter_params)
               if drafter_params else 0)
    if not streamed:
        loaded = shape.params() * LOADED_BYTES_PER_PARAM
        return Estimate(max(loaded, drafter), disk, "loading the model through transformers")
    # The checkpoint tensor, its fp32 copy, and the quantizer's buffers.
    writing = STREAM_BASE + shape.largest_tensor() * (2 + 4 + 4)
    if validate_layers:
        # The first layers three times (transformers, our module, the graph), fp32, on a few vocab rows.
        checking = STREAM_BASE + validate_layers * shape.layer_params() * 4 * 3
    else:
        checking = STREAM_BASE + shape.params() * (4 + 4 + WEIGHT_BYTES[dtype])
    how = ("validating the whole model in memory" if not validate_layers and checking > max(writing, drafter) else
           "validating the drafter in memory" if drafter > max(writing, checking) else "streaming the weights")
    return Estimate(max(writing, checking, drafter), disk, how)


def available_memory() -> float:
    """Bytes the kernel could give this process now (MemAvailable), or infinity where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def check_fits(need: Estimate, out: Path, lower_it: str) -> None:
    """One line and no export when the estimate exceeds free memory or disk. DFLASH_EXPORT_NO_CHECK=1
    skips it (the estimate is conservative; a user who knows better may try)."""
    if os.environ.get("DFLASH_EXPORT_NO_CHECK") == "1":
        return
    free_mem = available_memory()
    if need.memory > free_mem:
        raise UserError(f"this export needs about {need.memory / GB:.1f} GB of memory ({need.how}) and "
                        f"{free_mem / GB:.1f} GB is available; {lower_it} (DFLASH_EXPORT_NO_CHECK=1 tries anyway)")
    free_disk = shutil.disk_usage(out.parent).free
    if need.disk * 1.05 > free_disk:
        raise UserError(f"this export writes about {need.disk / GB:.1f} GB to {out.parent} and "
                        f"{free_disk / GB:.1f} GB is free; free some space or choose another --output")
