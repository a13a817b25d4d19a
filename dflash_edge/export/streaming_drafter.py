"""The drafter's two graphs exported without holding its weights, the way streaming.py exports the target.

z-lab's drafters for 8B targets have about 1 B parameters of their own and borrow the target's embedding and
LM head (another 1 B at Llama 3's 128k vocabulary): loaded whole in fp32 next to the traced copies they took
more memory than the whole streamed target. Here both graphs are traced from placeholders, the drafter's
weights are read one tensor at a time from its safetensors, and the vocabulary matrices from the target's
checkpoint (or from the target module when it was loaded whole), straight into shared_weights.data, the file
the runtime maps once for every session.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from .drafter import DFlashDrafter, DrafterConfig, check_drafter_weights, drafter_parameter_shapes, rotary_for
from .shared import SHARED_FILE
from .streaming import Planned, SafetensorsSource, TensorSource, fill_placeholders, trace_planned, write_streamed

TARGET = "target:"  # prefix of the names DrafterWeights reads from the target's checkpoint
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # their names there (Hugging Face's)


class DrafterWeights:
    """The drafter's checkpoint and the target's vocabulary matrices as one source: `fc.weight` from the
    drafter's safetensors (with or without a `model.` prefix), `target:lm_head.weight` from the target's."""

    def __init__(self, drafter: SafetensorsSource | TensorSource, target: SafetensorsSource | TensorSource,
                 tied: bool, label: str = "the drafter"):
        self.drafter, self.target, self.tied, self.label = drafter, target, tied, label
        self._prefixed = {name.removeprefix("model."): name for name in drafter.names()}

    def drafter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {short: tuple(self.drafter.shape(full)) for short, full in self._prefixed.items()
                if short not in ("embed_tokens.weight", "lm_head.weight")}

    def get(self, name: str) -> torch.Tensor:
        if name.startswith(TARGET):
            name = name.removeprefix(TARGET)
            return self.target.get(EMBED if self.tied and name == HEAD else name)
        return self.drafter.get(self._prefixed[name])


def skeletons(config: DrafterConfig, dtype: torch.dtype, vocab_ids: list[int] | None, tied: bool,
              with_logits: bool = False):
    """The context and block graph modules, every parameter a placeholder, with the plan of each."""
    from .trace import DrafterBlockGraph, DrafterContextGraph

    vocab = (config.vocab_size, config.hidden_size)
    with torch.device("meta"):
        drafter = DFlashDrafter(config)
        block = DrafterBlockGraph(drafter, torch.empty(vocab), torch.empty(vocab), tied, vocab_ids, with_logits)
    drafter.rotary = rotary_for(config)
    if vocab_ids is not None:
        block.draft_to_target = torch.tensor(vocab_ids, dtype=torch.long)
    fill_placeholders(block, dtype)
    plans = {f"drafter.{name}": Planned(name) for name, _ in drafter.named_parameters()}
    plans["embed_tokens.weight"] = Planned(TARGET + EMBED)
    plans["lm_head.weight"] = Planned(TARGET + HEAD)
    plans["draft_head"] = Planned(TARGET + HEAD, rows=tuple(vocab_ids) if vocab_ids is not None else None)
    return DrafterContextGraph(drafter), block, plans


def export_drafter_streamed(config: DrafterConfig, weights: DrafterWeights, dtype: torch.dtype, folder: Path,
                            vocab_ids: list[int] | None = None,
                            progress: Callable[[int, int], None] | None = None, with_logits: bool = False) -> dict:
    """Write drafter_context.onnx and drafter_block.onnx (+ .data) into `folder`, the embedding and LM head
    into its shared_weights.data; returns the IO names (trace.drafter_io_names). with_logits: the block graph
    also returns draft_logits (validation's copies)."""
    from .trace import drafter_io_names

    check_drafter_weights(weights.label, drafter_parameter_shapes(config), weights.drafter_shapes())
    names = drafter_io_names(config.num_hidden_layers)
    if with_logits:
        names["block"]["outputs"].append("draft_logits")
    context, block, plans = skeletons(config, dtype, vocab_ids, weights.tied, with_logits)
    n, width, slots = torch.export.Dim("ctx_new"), torch.export.Dim("block"), torch.export.Dim("slots")
    cache_axes = tuple(axes for _ in range(config.num_hidden_layers) for axes in ({2: slots}, {3: slots}))
    cache = [torch.zeros(shape, dtype=dtype) for shape in context.drafter.cache_shapes(12)]
    feats = torch.zeros(1, 5, len(config.target_layer_ids) * config.hidden_size)
    ids = torch.tensor([[1] + [config.mask_token_id] * 3])
    graphs = [
        ("drafter_context.onnx", context, (feats, torch.arange(2, 7)[None], *cache), names["context"], [{1: n}, {1: n}]),
        ("drafter_block.onnx", block, (ids, torch.arange(7, 11)[None], *cache), names["block"],
         [{1: width}, {1: width}]),
    ]
    traced = []
    for file, module, args, io, axes in graphs:
        onnx_model, planned = trace_planned(module, args, io["inputs"], io["outputs"], [*axes, cache_axes], plans)
        traced.append((file, onnx_model, planned))
    total = sum(len(planned) for _, _, planned in traced)
    done = 0
    for file, onnx_model, planned in traced:
        shared = {name: SHARED_FILE for name in planned if name in ("embed_tokens.weight", "lm_head.weight")}

        def step(i: int, _: int, before=done) -> None:
            if progress is not None:
                progress(before + i, total)
        write_streamed(onnx_model, planned, weights, folder / file, dtype, step, elsewhere=shared)
        done += len(planned)
    return names


def first_layer_config(config: DrafterConfig, rows: list[int]) -> DrafterConfig:
    """The drafter's first layer over `rows` of the vocabulary (the mask token among them)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    small.vocab_size = len(rows)
    small.mask_token_id = rows.index(config.mask_token_id)
    return small


def vocabulary_rows(config: DrafterConfig, count: int) -> list[int]:
    """The first `count` token ids, the last replaced by the mask token when it lies beyond them."""
    rows = list(range(min(count, config.vocab_size)))
    if config.mask_token_id not in rows:
        rows[-1] = config.mask_token_id
    return rows


def load_weights(model: DFlashDrafter, weights: DrafterWeights) -> DFlashDrafter:
    """Fill `model` (fp32) tensor by tensor from the checkpoint."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights.get(name))
    return model.eval()
