"""Trace the target and drafter modules into ONNX with torch.onnx.export(dynamo=True)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from onnxscript import opset18 as op

from .modeling import BufferedTarget, TargetModel  # registers torch.ops.dflash_edge.values_product

OPSET = 18
# External data is required past protobuf's 2 GB limit; below it a single file loads faster.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3


# Query rows per product of the attention's values. ONNX Runtime's CPU MatMul sums a reduction in pieces
# whose length follows the product's column count (1,024 terms up to 16 columns, 512 up to 32, 256 up to
# 64; one column takes another kernel), so once the cache passes 256 slots a 16-token verify of SmolLM2 (48
# columns) rounded its rows differently from single steps (3 columns): 1e-6 apart in fp32, enough to flip a
# near-tie, and different tokens once a quantized graph rounds activations to int8. Products of 2-16
# columns all sum alike.
EXACT_COLUMNS = 16


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def values_product_onnx(values_t, probs, positions):
    """modeling.values_product as ONNX: the positions in chunks of at most EXACT_COLUMNS // groups, spread
    evenly (16 tokens with 3 groups: 4 chunks of 4), one batched MatMul that shares the cache operand.

    A step is one chunk of `groups` columns, as before; a verify streams the cache once per chunk. The
    chunk count follows the sequence length, so it is computed in the graph from `positions`, the same
    input in every layer, which the exporter's optimizer reduces to one copy of the arithmetic (each layer
    keeps two Concats of it); the reshapes take their other sizes from their input (0).
    """
    groups = probs.shape[2]
    per = max(1, EXACT_COLUMNS // groups)
    s = op.Shape(positions)
    chunks = op.Div(op.Add(s, _ints(per - 1)), _ints(per))
    width = op.Div(op.Sub(op.Add(s, chunks), _ints(1)), chunks)
    pad = op.Sub(op.Mul(chunks, width), s)
    p = op.Pad(probs, op.Concat(_ints(0, 0, 0, 0, 0, 0, 0, 0), pad, _ints(0), axis=0))
    p = op.Reshape(p, op.Concat(_ints(0, 0, 0), chunks, width, _ints(-1), axis=0))  # [b, kv, G, chunks, w, slots]
    # [b, kv, chunks, 1, G * w, slots]: only outer axes move, so the slots stay contiguous, and ONNX
    # Runtime folds the transpose after it into the MatMul.
    p = op.Reshape(op.Transpose(p, perm=[0, 1, 3, 2, 4, 5]), _ints(0, 0, 0, 1, -1, 0))
    out = op.MatMul(op.Unsqueeze(values_t, _ints(2)), op.Transpose(p, perm=[0, 1, 2, 3, 5, 4]))
    out = op.Reshape(out, _ints(0, 0, 0, 0, 0, groups, -1))  # [b, kv, chunks, parts, m, G, w]
    out = op.Transpose(out, perm=[0, 2, 6, 1, 5, 3, 4])  # [b, chunks, w, kv, G, parts, m]
    _, kv, parts, m, _ = values_t.shape
    out = op.Reshape(out, _ints(0, -1, int(kv) * groups * int(parts) * int(m)))  # [b, chunks * w, h * d]
    return op.Slice(out, _ints(0), s, _ints(1))  # drop the padding positions


def values_product_plain(values_t, probs, positions):
    """modeling.values_product as one MatMul (ONNX Runtime folds the transpose into it): rows within ~1e-6
    of single steps past 256 slots. The output takes two 4-D transposes, which ONNX Runtime runs faster
    than one 6-D transpose on a prefill's long rows."""
    _, kv, parts, m, _ = values_t.shape
    groups, d = probs.shape[2], int(parts) * int(m)
    rows = op.Reshape(probs, _ints(0, 0, 1, -1, 0))  # [b, kv, 1, G * s, slots]
    out = op.MatMul(values_t, op.Transpose(rows, perm=[0, 1, 2, 4, 3]))  # [b, kv, parts, m, G * s]
    out = op.Transpose(op.Reshape(out, _ints(0, 0, d, -1)), perm=[0, 1, 3, 2])  # [b, kv, G * s, d]
    out = op.Reshape(out, _ints(0, int(kv) * groups, -1, d))  # [b, h, s, d]
    return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), _ints(0, 0, -1))


def target_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "position_ids", "logits_index"]
    outputs = ["logits", "next_token_ids", "aux_hidden_states"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _example_target_inputs(model: TargetModel, seq: int = 3, past: int = 4, slots: int = 10):
    dtype = model.embed_tokens.weight.dtype
    vocab = model.embed_tokens.num_embeddings
    kv = [torch.randn(shape, dtype=dtype) for shape in model.cache_shapes(1, slots)]
    return (
        torch.randint(0, vocab, (1, seq)),
        torch.arange(past, past + seq)[None],
        torch.arange(seq, dtype=torch.int64),
        *kv,
    )


def export_target(model: TargetModel, path: Path, exact_rows: bool = False) -> dict:
    """Write target.onnx (BufferedTarget: batch 1, the cache written in place); returns the IO names.

    exact_rows: the attention's values product in chunks (values_product_onnx), so that a verify's rows
    equal single steps bit for bit on ONNX Runtime's CPU provider. Graphs that round activations (int8)
    need it. Against one product it cost SmolLM2 on 2 AVX2 cores 0-5 % on a decode step, 5-15 % on a
    16-token verify and about 9 % on a prefill (three runs, noisy; the extra ops of every layer, not the
    arithmetic), for differences of ~1e-6 where nothing rounds activations, so the others keep one product.
    """
    inputs, outputs = target_io_names(model.spec.num_layers)
    seq, slots, kept = torch.export.Dim("seq"), torch.export.Dim("slots"), torch.export.Dim("kept")
    shapes = [{1: seq}, {1: seq}, {0: kept}]
    shapes.append(tuple(axes for _ in range(model.spec.num_layers) for axes in ({2: slots}, {3: slots})))
    product = values_product_onnx if exact_rows else values_product_plain
    _export(BufferedTarget(model), _example_target_inputs(model), path, inputs, outputs, shapes,
            {torch.ops.dflash_edge.values_product.default: product})
    return {"inputs": inputs, "outputs": outputs}


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes, translations=None) -> None:
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
            custom_translation_table=translations,
            external_data=size >= EXTERNAL_DATA_THRESHOLD,
        )
    program.save(str(path), external_data=size >= EXTERNAL_DATA_THRESHOLD)


class DrafterContextGraph(torch.nn.Module):
    """target_hidden [1,n,n_taps*H] fp32, position_ids [1,n], *past_context -> *present_context: the draft
    cache buffers with the n positions' context K/V written at slots position_ids (in place when bound)."""

    def __init__(self, drafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, target_hidden, position_ids, *past_context):
        return tuple(self.drafter.context_into(target_hidden, position_ids, list(past_context)))


class DrafterBlockGraph(torch.nn.Module):
    """input_ids [1,B], position_ids [1,B], *past_context -> draft_ids [1,B-1] (argmax in the graph).
    The draft cache buffer's slots before position_ids[0] are the context; later ones are ignored.

    The embedding and LM head are parameters named as in the target graph (embed_tokens.weight,
    lm_head.weight), so the runtime can hand both sessions one shared copy. With draft_vocab (target ids),
    the graph scores only those rows of the head (its own draft_head.weight) and maps the winner back
    to a target id: reading the whole head is most of a small drafter's cost. with_logits: the logits as a
    second output, for validation (the runtime's graph returns ids only).
    """

    def __init__(self, drafter, embed_weight: torch.Tensor, head_weight: torch.Tensor, tied: bool,
                 draft_vocab: list[int] | None = None, with_logits: bool = False):
        super().__init__()
        self.drafter = drafter
        self.with_logits = with_logits
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
        hidden = d.block_hidden_in_buffer(x.to(d.fc.weight.dtype), position_ids, list(past_context))
        head = self.draft_head if self.reduced else self.embed_tokens.weight if self.tied else self.lm_head.weight
        logits = d.logits(hidden[:, 1:], head)
        ids = self.draft_to_target[logits.argmax(-1)] if self.reduced else logits.argmax(-1)
        return (ids, logits) if self.with_logits else ids


def drafter_io_names(num_layers: int) -> dict:
    past, present = [], []
    for i in range(num_layers):
        past += [f"past_context.{i}.key", f"past_context.{i}.value"]
        present += [f"present_context.{i}.key", f"present_context.{i}.value"]
    return {
        "context": {"inputs": ["target_hidden", "position_ids", *past], "outputs": present},
        "block": {"inputs": ["input_ids", "position_ids", *past], "outputs": ["draft_ids"]},
    }


def export_drafter(drafter, embed_weight, head_weight, tied: bool, context_path: Path, block_path: Path,
                   draft_vocab: list[int] | None = None) -> dict:
    cfg = drafter.config
    names = drafter_io_names(cfg.num_hidden_layers)
    dtype = drafter.fc.weight.dtype
    n, block, slots = torch.export.Dim("ctx_new"), torch.export.Dim("block"), torch.export.Dim("slots")
    cache_axes = tuple(axes for _ in range(cfg.num_hidden_layers) for axes in ({2: slots}, {3: slots}))
    cache = [torch.randn(shape, dtype=dtype) for shape in drafter.cache_shapes(12)]
    feats = torch.randn(1, 5, len(cfg.target_layer_ids) * cfg.hidden_size)
    _export(DrafterContextGraph(drafter), (feats, torch.arange(2, 7)[None], *cache), context_path,
            names["context"]["inputs"], names["context"]["outputs"], [{1: n}, {1: n}, cache_axes])

    ids = torch.tensor([[1] + [cfg.mask_token_id] * 3])
    graph = DrafterBlockGraph(drafter, embed_weight.to(dtype), head_weight.to(dtype), tied, draft_vocab)
    _export(graph, (ids, torch.arange(7, 11)[None], *cache), block_path,
            names["block"]["inputs"], names["block"]["outputs"], [{1: block}, {1: block}, cache_axes])
    return names
