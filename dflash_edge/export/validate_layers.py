"""Validation of a streamed export too big to hold in memory: the same streaming path run on the model's
first layers and first vocabulary rows, checked against transformers and against our module, plus the
structural checks of the whole graph.

What it proves: the trace, the names that map graph initializers to checkpoint tensors (every kind: the
embedding, the LM head, each projection, each norm), the transposes and the casts, on the real weights.
The other layers are the same code with another layer number. What it cannot: numbers from the full depth.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from .streaming import export_target_streamed
from .validate import Report, check_module, validate_target

FIRST_LAYERS = 2
VOCAB_ROWS = 4096
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class FirstLayers:
    """A checkpoint seen through its first `layers` layers and first `rows` vocabulary rows."""

    def __init__(self, source, layers: int, rows: int):
        self.source, self.layers, self.rows = source, layers, rows

    def _keeps(self, name: str) -> bool:
        parts = name.split(".")
        return not (len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= self.layers)

    def names(self) -> set[str]:
        return {n for n in self.source.names() if self._keeps(n)}

    def get(self, name: str) -> torch.Tensor:
        tensor = self.source.get(name)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:self.rows].clone()
        return tensor


def first_layers_config(config, layers: int, rows: int):
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    small.vocab_size = min(config.vocab_size, rows)
    if getattr(small, "layer_types", None):
        small.layer_types = small.layer_types[:layers]
    return small


@torch.no_grad()
def check_first_layers(config, weights, family: str, dtype: torch.dtype, label: str, exact_rows: bool,
                       report: Report, verify_rows: int) -> None:
    """Stream-export the first layers of the checkpoint (weights: a streaming source, sources.open_weights)
    and hold them to the full validation."""
    from transformers import AutoModelForCausalLM

    from .modeling import load_target_from_hf

    view = FirstLayers(weights, FIRST_LAYERS, VOCAB_ROWS)
    small = first_layers_config(config, FIRST_LAYERS, VOCAB_ROWS)
    taps = list(range(FIRST_LAYERS))  # a plain block output and the last one (taken after the final norm)
    hf = AutoModelForCausalLM.from_config(small, dtype=torch.float32).eval()
    params = dict(hf.named_parameters())
    if small.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    if set(params) != view.names():
        raise ValueError(f"the first layers do not match the checkpoint's names: "
                         f"{sorted(set(params) ^ view.names())[:3]}")
    for name, p in params.items():  # one tensor at a time: no second copy of the layers
        p.copy_(view.get(name))
    target = load_target_from_hf(hf, taps, qk_norm=(family == "qwen3"))
    check_module(target, hf, report)
    del hf
    with tempfile.TemporaryDirectory(prefix="dflash-first-layers-") as tmp:
        io = export_target_streamed(small, Path(tmp), taps, family == "qwen3", dtype, Path(tmp) / "target.onnx",
                                    exact_rows=exact_rows, source=view)
        io.pop("quantized")
        manifest = {"target": {"graph": "target.onnx", **io}}
        # Without prepacking: ONNX Runtime would keep a second, repacked copy of every weight (1.7 GB at 8B).
        validate_target(Path(tmp), manifest, target.to(dtype), report, label=label, verify_rows=verify_rows,
                        prepack=False)


@torch.no_grad()
def check_drafter_first_layer(config, weights, dtype: torch.dtype, report: Report) -> None:
    """Stream-export the drafter's first layer over VOCAB_ROWS rows of the vocabulary and hold it to the
    drafter's full validation, against our module filled from the same checkpoint in fp32."""
    from .drafter import DFlashDrafter, drafter_parameter_shapes
    from .shared import share_weights
    from .streaming import TensorSource
    from .streaming_drafter import (EMBED, HEAD, TARGET, DrafterWeights, export_drafter_streamed,
                                    first_layer_config, load_weights, vocabulary_rows)
    from .validate import validate_drafter

    rows = vocabulary_rows(config, VOCAB_ROWS)
    small = first_layer_config(config, rows)
    vocab = {name: weights.get(TARGET + name)[rows].float() for name in (EMBED, HEAD)}
    part = DrafterWeights(TensorSource({name: weights.get(name) for name in drafter_parameter_shapes(small)}),
                          TensorSource(vocab), tied=False, label=weights.label)
    module = load_weights(DFlashDrafter(small), part)
    with tempfile.TemporaryDirectory(prefix="dflash-drafter-layer-") as tmp:
        io = export_drafter_streamed(small, part, dtype, Path(tmp), with_logits=True)
        manifest = {"drafter": {"context_graph": "drafter_context.onnx", "block_graph": "drafter_block.onnx",
                                "io": io},
                    "shared_weights": share_weights(Path(tmp), ["drafter_block.onnx"], ["embed_tokens.weight",
                                                                                       "lm_head.weight"])}
        validate_drafter(Path(tmp), manifest, module.to(dtype), vocab[EMBED].to(dtype), vocab[HEAD].to(dtype),
                         report, note=f" (layer 0, {VOCAB_ROWS} vocab rows, {DTYPE_NAMES[dtype]})")


def check_structure(path: Path, report: Report, label: str) -> None:
    """The whole graph: the ONNX checker, and every initializer lying inside the external-data file
    without overlapping another (nothing is loaded)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        report.check(label, "onnx checker", True, "passes (whole graph, weights not loaded)")
    except onnx.checker.ValidationError as e:
        report.check(label, "onnx checker", False, str(e).splitlines()[0])
    model = onnx.load(str(path), load_external_data=False)
    spans: dict[str, list[tuple[int, int]]] = {}  # per data file (a drafter's vocab matrices lie in the shared one)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            spans.setdefault(info["location"], []).append((int(info.get("offset", 0)), int(info.get("length", 0))))
    ok, size, count = True, 0, 0
    for location, file_spans in spans.items():
        file_spans.sort()
        file_size = (path.parent / location).stat().st_size
        overlap = any(a + n > b for (a, n), (b, _) in zip(file_spans, file_spans[1:]))
        ok = ok and not overlap and all(a + n <= file_size for a, n in file_spans)
        size, count = size + file_size, count + len(file_spans)
    report.check(label, "external data", ok,
                 f"{count} tensors, {size / 1e9:.2f} GB, each inside its file, none overlapping"
                 if ok else "tensors overlap or run past the end of their data file")
