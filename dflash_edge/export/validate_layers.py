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

from .streaming import SafetensorsSource, export_target_streamed
from .validate import Report, check_module, validate_target

FIRST_LAYERS = 2
VOCAB_ROWS = 4096


class FirstLayers:
    """A checkpoint seen through its first `layers` layers and first `rows` vocabulary rows."""

    def __init__(self, source: SafetensorsSource, layers: int, rows: int):
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
def check_first_layers(config, folder: Path, family: str, dtype: torch.dtype, label: str, exact_rows: bool,
                       report: Report, verify_rows: int) -> None:
    """Stream-export the first layers of the checkpoint and hold them to the full validation."""
    from transformers import AutoModelForCausalLM

    from .modeling import load_target_from_hf

    view = FirstLayers(SafetensorsSource(folder), FIRST_LAYERS, VOCAB_ROWS)
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
        io = export_target_streamed(small, folder, taps, family == "qwen3", dtype, Path(tmp) / "target.onnx",
                                    exact_rows=exact_rows, source=view)
        io.pop("quantized")
        manifest = {"target": {"graph": "target.onnx", **io}}
        # Without prepacking: ONNX Runtime would keep a second, repacked copy of every weight (1.7 GB at 8B).
        validate_target(Path(tmp), manifest, target.to(dtype), report, label=label, verify_rows=verify_rows,
                        prepack=False)


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
    size = (path.parent / (path.name + ".data")).stat().st_size
    spans = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            spans.append((int(info.get("offset", 0)), int(info.get("length", 0))))
    spans.sort()
    overlap = any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:]))
    inside = all(a + n <= size for a, n in spans)
    report.check(label, "external data", inside and not overlap,
                 f"{len(spans)} tensors, {size / 1e9:.2f} GB, each inside the file, none overlapping"
                 if inside and not overlap else "tensors overlap or run past the end of the data file")
