"""Trace the target and drafter modules into ONNX with torch.onnx.export(dynamo=True)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .modeling import TargetModel

OPSET = 18
# External data is required past protobuf's 2 GB limit; below it a single file loads faster.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3


def target_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "position_ids", "attention_mask", "logits_index"]
    outputs = ["logits", "aux_hidden_states"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _example_target_inputs(model: TargetModel, seq: int = 3, past: int = 4):
    dtype = model.embed_tokens.weight.dtype
    vocab = model.embed_tokens.num_embeddings
    kv = [torch.randn(shape, dtype=dtype) for shape in model.cache_shapes(1, past)]
    return (
        torch.randint(0, vocab, (1, seq)),
        torch.arange(past, past + seq)[None],
        torch.ones(1, past + seq, dtype=torch.int64),
        torch.arange(seq, dtype=torch.int64),
        *kv,
    )


def export_target(model: TargetModel, path: Path) -> dict:
    """Write target.onnx; returns the IO names for the manifest."""
    inputs, outputs = target_io_names(model.spec.num_layers)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    total, kept = torch.export.Dim("total"), torch.export.Dim("kept")
    shapes = [{0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: total}, {0: kept}]
    shapes.append(tuple(axes for _ in range(model.spec.num_layers)
                        for axes in ({0: batch, 2: past}, {0: batch, 3: past})))  # *past: keys, values
    _export(model, _example_target_inputs(model), path, inputs, outputs, shapes)
    return {"inputs": inputs, "outputs": outputs}


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    # The exporter warns that torchvision ops are unavailable; they are never used here. Its graph
    # optimizer logs every rewrite it tries at INFO (thousands of lines for one model).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET,
            input_names=input_names, output_names=output_names,
            dynamic_shapes=tuple(dynamic_shapes), optimize=True, verbose=False,
            external_data=size >= EXTERNAL_DATA_THRESHOLD,
        )
    program.save(str(path), external_data=size >= EXTERNAL_DATA_THRESHOLD)


class DrafterContextGraph(torch.nn.Module):
    """target_hidden [b,n,n_taps*H] fp32, position_ids [b,n] -> context.{i}.key|value [b,kv,n,d]."""

    def __init__(self, drafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, target_hidden, position_ids):
        return tuple(self.drafter.context_kv(target_hidden, position_ids))


class DrafterBlockGraph(torch.nn.Module):
    """input_ids [b,B], position_ids [b,B], *past_context -> draft_ids [b,B-1] (argmax in the graph).

    The embedding and LM head are parameters named as in the target graph (embed_tokens.weight,
    lm_head.weight), so the runtime can hand both sessions one shared copy. With draft_vocab (target ids),
    the graph scores only those rows of the head (its own draft_head.weight) and maps the winner back
    to a target id: reading the whole head is most of a small drafter's cost.
    """

    def __init__(self, drafter, embed_weight: torch.Tensor, head_weight: torch.Tensor, tied: bool,
                 draft_vocab: list[int] | None = None):
        super().__init__()
        self.drafter = drafter
        self.embed_tokens = torch.nn.Embedding.from_pretrained(embed_weight.detach().clone(), freeze=True)
        self.tied = tied
        self.reduced = draft_vocab is not None
        if self.reduced:
            ids = torch.tensor(draft_vocab, dtype=torch.long)
            self.draft_head = torch.nn.Parameter(head_weight.detach()[ids].clone(), requires_grad=False)
            self.register_buffer("draft_to_target", ids)
        elif not tied:
            self.lm_head = torch.nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
            self.lm_head.weight = torch.nn.Parameter(head_weight.detach().clone(), requires_grad=False)

    def forward(self, input_ids, position_ids, *past_context):
        d = self.drafter
        x = self.embed_tokens(input_ids)
        if d.config.input_embedding_scale != 1.0:
            x = x * d.config.input_embedding_scale
        hidden = d.block_hidden(x.to(d.fc.weight.dtype), position_ids, list(past_context))
        if self.reduced:
            return self.draft_to_target[d.logits(hidden[:, 1:], self.draft_head).argmax(-1)]
        head = self.embed_tokens.weight if self.tied else self.lm_head.weight
        return d.logits(hidden[:, 1:], head).argmax(-1)


def drafter_io_names(num_layers: int) -> dict:
    ctx_out, blk_in = [], ["input_ids", "position_ids"]
    for i in range(num_layers):
        ctx_out += [f"context.{i}.key", f"context.{i}.value"]
        blk_in += [f"past_context.{i}.key", f"past_context.{i}.value"]
    return {
        "context": {"inputs": ["target_hidden", "position_ids"], "outputs": ctx_out},
        "block": {"inputs": blk_in, "outputs": ["draft_ids"]},
    }


def export_drafter(drafter, embed_weight, head_weight, tied: bool, context_path: Path, block_path: Path,
                   draft_vocab: list[int] | None = None) -> dict:
    cfg = drafter.config
    names = drafter_io_names(cfg.num_hidden_layers)
    batch, n = torch.export.Dim("batch"), torch.export.Dim("ctx_new")
    feats = torch.randn(1, 5, len(cfg.target_layer_ids) * cfg.hidden_size)
    _export(DrafterContextGraph(drafter), (feats, torch.arange(5)[None]), context_path,
            names["context"]["inputs"], names["context"]["outputs"], [{0: batch, 1: n}, {0: batch, 1: n}])

    block, ctx = torch.export.Dim("block"), torch.export.Dim("ctx")
    dtype = drafter.fc.weight.dtype
    past = [torch.randn(1, cfg.num_key_value_heads, 7, cfg.head_dim, dtype=dtype)
            for _ in range(2 * cfg.num_hidden_layers)]
    ids = torch.tensor([[1] + [cfg.mask_token_id] * 3])
    graph = DrafterBlockGraph(drafter, embed_weight.to(dtype), head_weight.to(dtype), tied, draft_vocab)
    _export(graph, (ids, torch.arange(7, 11)[None], *past), block_path,
            names["block"]["inputs"], names["block"]["outputs"],
            [{0: batch, 1: block}, {0: batch, 1: block},
             tuple({0: batch, 2: ctx} for _ in range(2 * cfg.num_hidden_layers))])
    return names
