"""The target graph exported without holding the target's weights in memory.

The graph is traced from a skeleton whose parameters are zero-stride placeholders (one element each, the
right shapes and dtype), so tracing costs the same for 135 M and 8 B parameters. The exporter's optimizer
would fold the transposes of the weights into new constants, which materialises them; here that fold is
recorded instead: the Transpose node goes and the weight it fed is written transposed. Every weight is then
read from the memory-mapped safetensors source in its own dtype (bf16 for most checkpoints), cast and
transposed one tensor at a time, and appended to the external-data file, so peak memory is about the
largest tensor, whatever the depth.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from .modeling import BufferedTarget, DecoderSpec, Rotary, TargetModel

ALIGNMENT = 4096  # bytes; each tensor starts on a page, so ONNX Runtime can map it in place


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class SafetensorsSource:
    """Tensors of a Hugging Face folder's *.safetensors files, each read from disk when asked for.

    Plain reads, not a memory map: pages of a mapped checkpoint stay resident (and count in the process's
    memory) once read, so mapping grew the peak by the whole checkpoint; a read buffer is freed with the
    tensor."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} has no *.safetensors weights to stream")
        self._where = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    size = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(size))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {f}: {e}") from None
            for name, meta in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, 8 + size + meta["data_offsets"][0],
                                         meta["data_offsets"][1] - meta["data_offsets"][0], meta["dtype"], meta["shape"])

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"the checkpoint has no tensor {name!r}")
        path, offset, length, dtype, shape = self._where[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: {name} is {dtype}; streaming reads {', '.join(SAFETENSORS_DTYPES)}")
        buffer = bytearray(length)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buffer) != length:
                raise UserError(f"{path} is truncated (at {name})")
        return torch.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[dtype]).reshape(shape)


def rotary_for(config) -> Rotary:
    """The target's rotary table from its config alone (Hugging Face's own rope code, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    hf_rotary = type(meta.model.rotary_emb)(config=config, device="cpu")
    return Rotary(hf_rotary.inv_freq, getattr(hf_rotary, "attention_scaling", 1.0))


def skeleton(config, tap_layer_ids: list[int], qk_norm: bool, dtype: torch.dtype) -> TargetModel:
    """A TargetModel of the config's shapes whose parameters are zero-stride placeholders."""
    spec = DecoderSpec.from_hf_config(config, qk_norm=qk_norm)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with torch.device("meta"):
        model = TargetModel(spec, config.vocab_size, Rotary(torch.ones(spec.head_dim // 2)), tap_layer_ids, tied)
    model.rotary = rotary_for(config)
    count = 0
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                # A different value in each: the optimizer merges initializers of equal contents, which would
                # give every layer's norm one shared weight.
                count += 1
                if float(torch.tensor(float(count), dtype=dtype)) != count:
                    raise ValueError(f"{count} placeholders do not all differ in {dtype}")
                module._parameters[name] = torch.nn.Parameter(
                    torch.full((1,), float(count), dtype=dtype).expand(p.shape), requires_grad=False)
    return model.eval()


def source_name(graph_name: str) -> str:
    """target.layers.0.mlp.up_proj.weight -> model.layers.0.mlp.up_proj.weight (lm_head stays at the top)."""
    name = graph_name.removeprefix("target.")
    return name if name.startswith("lm_head.") else f"model.{name}"


def trace_weightless(model: TargetModel, exact_rows: bool):
    """The target graph (onnx_ir) with placeholder weights, weight transposes recorded, then optimized
    without ever computing with a weight. Returns (model, {initializer name: (source name, transposed)})."""
    import onnx_ir as ir
    import onnxscript.optimizer

    from . import trace

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    inputs, outputs = trace.target_io_names(model.spec.num_layers)
    seq, slots, kept = torch.export.Dim("seq"), torch.export.Dim("slots"), torch.export.Dim("kept")
    shapes = [{1: seq}, {1: seq}, {0: kept},
              tuple(axes for _ in range(model.spec.num_layers) for axes in ({2: slots}, {3: slots}))]
    product = trace.values_product_onnx if exact_rows else trace.values_product_plain
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            BufferedTarget(model), trace._example_target_inputs(model), dynamo=True, opset_version=trace.OPSET,
            input_names=inputs, output_names=outputs, dynamic_shapes=tuple(shapes), optimize=False,
            verbose=False, custom_translation_table={torch.ops.dflash_edge.values_product.default: product})
    onnx_model = program.model
    graph = onnx_model.graph
    params = {f"target.{n}" for n, _ in model.named_parameters()}
    weights = {name: (source_name(name), False) for name in graph.initializers if name in params}
    for node in list(graph):
        value = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        perm = node.attributes.get("perm")
        if (value is None or value.name not in weights or len(value.uses()) != 1
                or perm is None or list(perm.as_ints()) != [1, 0]):
            continue
        # The weight is written transposed; the node's consumers read it directly.
        rows, cols = value.shape
        src, _ = weights.pop(value.name)
        flipped = ir.Value(name=f"{value.name}.T", shape=ir.Shape([cols, rows]), type=value.type,
                           const_value=ir.tensor(torch.zeros(1, dtype=model.embed_tokens.weight.dtype)
                                                 .expand(cols, rows).numpy(), name=f"{value.name}.T"))
        graph.register_initializer(flipped)
        node.outputs[0].replace_all_uses_with(flipped)
        graph.remove(node, safe=True)
        graph.initializers.pop(value.name)
        weights[flipped.name] = (src, True)

    def should_fold(node):
        return False if any(v is not None and v.name in weights for v in node.inputs) else None

    onnxscript.optimizer.optimize_ir(onnx_model, should_fold=should_fold)
    return onnx_model, {name: weights[name] for name in onnx_model.graph.initializers if name in weights}


def write_streamed(onnx_model, weights: dict, source, path: Path, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None) -> None:
    """Append every weight to path's external-data file, one tensor at a time, then save the graph."""
    import onnx_ir as ir

    data_name = path.name + ".data"
    graph = onnx_model.graph
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        for i, (name, (src, transposed)) in enumerate(weights.items()):
            tensor = source.get(src)
            value = graph.initializers[name]
            shape = tuple(reversed(tensor.shape)) if transposed else tuple(tensor.shape)
            if shape != tuple(value.shape):
                raise UserError(f"{src} has shape {tuple(tensor.shape)} in the checkpoint; the config implies "
                                f"{tuple(value.shape)}")
            # One buffer in the export dtype, filled by a single cast-and-transpose copy, written as it is.
            out = torch.empty(shape, dtype=dtype)
            out.copy_(tensor.t() if transposed else tensor)
            del tensor
            pad = -offset % ALIGNMENT
            f.write(b"\0" * pad)
            offset += pad
            length = out.numel() * out.element_size()
            f.write(out.view(torch.uint8).numpy().data if out.numel() else b"")
            del out
            value.const_value = ir.ExternalTensor(data_name, offset, length, value.const_value.dtype,
                                                  shape=value.shape, name=name, base_dir=path.parent)
            offset += length
            if progress is not None:
                progress(i + 1, len(weights))
    ir.save(onnx_model, path)


def export_target_streamed(config, folder: Path, tap_layer_ids: list[int], qk_norm: bool, dtype: torch.dtype,
                           path: Path, exact_rows: bool = False,
                           progress: Callable[[int, int], None] | None = None) -> dict:
    """Write target.onnx (+ .data) for the checkpoint in `folder` without loading it; returns the IO names."""
    from . import trace

    model = skeleton(config, tap_layer_ids, qk_norm, dtype)
    onnx_model, weights = trace_weightless(model, exact_rows)
    source = SafetensorsSource(folder)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = sorted({src for src, _ in weights.values()} - source.names())
    if missing:
        raise UserError(f"{folder}: the checkpoint lacks {len(missing)} tensors the config implies "
                        f"(first: {missing[0]}){'; it ties the LM head to the embedding' if tied else ''}")
    write_streamed(onnx_model, weights, source, path, dtype, progress)
    inputs, outputs = trace.target_io_names(config.num_hidden_layers)
    return {"inputs": inputs, "outputs": outputs}

