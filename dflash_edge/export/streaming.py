"""The target graph exported without holding the target's weights in memory.

The graph is traced from a skeleton whose parameters are zero-stride placeholders (one element each, the
right shapes and dtype), so tracing costs the same for 135 M and 8 B parameters. The exporter's optimizer
would fold the transposes of the weights into new constants, which materialises them; here that fold is
recorded instead: the Transpose node goes and the weight it fed is written transposed. With --quantize, each
weight product is planned as the quantized op (MatMulNBits, or DequantizeLinear for TensorRT) before any
weight exists. Every weight is then read from the safetensors source in its own dtype (bf16 for most
checkpoints), cast, transposed and quantized one tensor at a time, and appended to the external-data file,
so peak memory is about the largest tensor, whatever the depth.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import torch

from ..errors import UserError
from .modeling import BufferedTarget, DecoderSpec, Rotary, TargetModel
from .trace import OPSET

ALIGNMENT = 4096  # bytes; each tensor starts on a page, so ONNX Runtime can map it in place


@dataclass
class Planned:
    """How one initializer of the graph is filled from the checkpoint."""

    source: str                  # the tensor's name in the checkpoint
    transposed: bool = False     # written [in, out], for a MatMul
    bits: int = 0                # 4 or 8: block-quantized (this initializer holds the packed values)
    scales: str | None = None    # with bits: the initializer of the blocks' scales
    standard_ops: bool = False   # with bits: DequantizeLinear's layout, else MatMulNBits'
    shape: tuple[int, ...] = ()  # with bits: the weight's [K, N] (the initializer's shape is the packing's)
    dtype: torch.dtype | None = None   # written in this dtype rather than the export's (a Cast folded in)
    rows: tuple[int, ...] | None = None  # only these rows of the source tensor (a reduced draft vocabulary)


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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][4])

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


def _cast_dtypes():
    import onnx_ir as ir

    return {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16}


CAST_DTYPES = _cast_dtypes()
PLACEHOLDER_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def placeholder(count: int, dtype: torch.dtype) -> torch.Tensor:
    """One element whose bit pattern is `count`: a tiny positive number, finite and distinct for every count
    in every float dtype (bf16's integers stop being distinct at 256, its bit patterns do not)."""
    return torch.tensor([count], dtype=PLACEHOLDER_BITS[dtype]).view(dtype)


def skeleton(config, tap_layer_ids: list[int], qk_norm: bool, dtype: torch.dtype) -> TargetModel:
    """A TargetModel of the config's shapes whose parameters are zero-stride placeholders."""
    spec = DecoderSpec.from_hf_config(config, qk_norm=qk_norm)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with torch.device("meta"):
        model = TargetModel(spec, config.vocab_size, Rotary(torch.ones(spec.head_dim // 2)), tap_layer_ids, tied)
    model.rotary = rotary_for(config)
    return fill_placeholders(model, dtype)


def fill_placeholders(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every parameter of `model` (on the meta device) made a zero-stride placeholder of its shape."""
    count = 0
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                # A different value in each: the optimizer merges initializers of equal contents, which would
                # give every layer's norm one shared weight.
                count += 1
                module._parameters[name] = torch.nn.Parameter(placeholder(count, dtype).expand(p.shape),
                                                              requires_grad=False)
    return model.eval()


class TensorSource:
    """Tensors already in memory, seen as a checkpoint (a target loaded whole, a view of some rows)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def source_name(graph_name: str) -> str:
    """target.layers.0.mlp.up_proj.weight -> model.layers.0.mlp.up_proj.weight (lm_head stays at the top)."""
    name = graph_name.removeprefix("target.")
    return name if name.startswith("lm_head.") else f"model.{name}"


def trace_weightless(model: TargetModel, exact_rows: bool):
    """The target graph (onnx_ir) with placeholder weights, weight transposes recorded, then optimized
    without ever computing with a weight. Returns (model, {initializer name: Planned})."""
    from . import trace

    inputs, outputs = trace.target_io_names(model.spec.num_layers)
    seq, slots, kept = torch.export.Dim("seq"), torch.export.Dim("slots"), torch.export.Dim("kept")
    shapes = [{1: seq}, {1: seq}, {0: kept},
              tuple(axes for _ in range(model.spec.num_layers) for axes in ({2: slots}, {3: slots}))]
    product = trace.values_product_onnx if exact_rows else trace.values_product_plain
    sources = {f"target.{n}": Planned(source_name(f"target.{n}")) for n, _ in model.named_parameters()}
    return trace_planned(BufferedTarget(model), trace._example_target_inputs(model), inputs, outputs, shapes,
                         sources, {torch.ops.dflash_edge.values_product.default: product})


def trace_planned(module, args, input_names, output_names, dynamic_shapes, plans: dict, translations=None):
    """Trace `module` (placeholder parameters) and optimize its graph without computing with a weight.

    plans: {graph initializer name: Planned} for the parameters to stream. The optimizer would fold a
    Transpose or Cast of a weight into a new constant, which materialises it; here such a node goes and its
    Planned records it (the weight is written transposed, or in the Cast's dtype). Returns (onnx_ir model,
    {initializer name: Planned}) for the initializers the optimized graph keeps."""
    import onnxscript.optimizer

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, input_names=input_names, output_names=output_names,
            dynamic_shapes=tuple(dynamic_shapes), optimize=False, verbose=False,
            custom_translation_table=translations)
    onnx_model = program.model
    graph = onnx_model.graph
    weights = {name: plans[name] for name in graph.initializers if name in plans}
    for node in list(graph):  # topological: a Cast's output, once planned, is seen by the Transpose after it
        value = node.inputs[0] if node.op_type in ("Transpose", "Cast") and node.inputs else None
        if value is None or value.name not in weights or len(value.uses()) != 1:
            continue
        planned = weights[value.name]
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            if perm is None or list(perm.as_ints()) != [1, 0] or planned.transposed:
                continue
            name, shape, dtype = f"{value.name}.T", [value.shape[1], value.shape[0]], value.type.dtype
            changed = dataclasses.replace(planned, transposed=True)
        else:
            to = node.outputs[0].type.dtype
            if to not in CAST_DTYPES:
                continue
            name, shape, dtype = f"{value.name}.{to.name.lower()}", list(value.shape), to
            changed = dataclasses.replace(planned, dtype=CAST_DTYPES[to])
        weights[_replace_with_initializer(graph, node, value, name, shape, dtype)] = changed
        del weights[value.name]

    def should_fold(node):
        return False if any(v is not None and v.name in weights for v in node.inputs) else None

    onnxscript.optimizer.optimize_ir(onnx_model, should_fold=should_fold)
    return onnx_model, {name: weights[name] for name in onnx_model.graph.initializers if name in weights}


def _replace_with_initializer(graph, node, value, name: str, shape: list[int], dtype) -> str:
    """Replace `node` (fed only by the initializer `value`) with a new placeholder initializer."""
    import onnx_ir as ir

    new = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                   const_value=ir.tensor(np.broadcast_to(np.zeros(1, dtype.numpy()), shape), name=name))
    graph.register_initializer(new)
    node.outputs[0].replace_all_uses_with(new)
    graph.remove(node, safe=True)
    graph.initializers.pop(value.name)
    return name


def quantize_products(onnx_model, weights: dict, kind: str, standard_ops: bool) -> int:
    """Plan every weight MatMul as a block-quantized product, as quantize.quantize_target does after a
    traced export (same ops, layouts and settings), before any weight exists. Returns how many."""
    import onnx_ir as ir

    from .quantize import BLOCK, NBITS

    bits, level = NBITS[kind]
    graph = onnx_model.graph
    dtype = ir.DataType.INT4 if standard_ops else ir.DataType.UINT8
    count = 0
    for node in list(graph):
        b = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if b is None or b.name not in weights or not weights[b.name].transposed:
            continue
        k, n = b.shape
        blocks = -(-k // BLOCK)
        if standard_ops:  # int4 [K, N] and scales [blocks, N], DequantizeLinear along K
            packed_shape, scales_shape = [k, n], [blocks, n]
        else:  # MatMulNBits: [N, blocks, BLOCK * bits / 8] and scales [N, blocks]
            packed_shape, scales_shape = [n, blocks, BLOCK * bits // 8], [n, blocks]
        packed = _pending(f"{b.name}_Q{bits}", dtype, packed_shape)
        scales = _pending(f"{b.name}_scales", b.type.dtype, scales_shape)
        graph.register_initializer(packed)
        graph.register_initializer(scales)
        if standard_ops:
            dq = ir.node("DequantizeLinear", [packed, scales], {"axis": 0, "block_size": BLOCK},
                         name=f"{node.name}_DQ", num_outputs=1)
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
        else:
            product = ir.node("MatMulNBits", [node.inputs[0], packed, scales],
                              {"K": k, "N": n, "bits": bits, "block_size": BLOCK, "accuracy_level": level},
                              domain="com.microsoft", name=f"{node.name}_Q{bits}", num_outputs=1)
            graph.insert_before(node, product)
            node.outputs[0].replace_all_uses_with(product.outputs[0])
            if node.outputs[0].is_graph_output():
                product.outputs[0].name = node.outputs[0].name
            graph.remove(node, safe=True)
        planned = weights.pop(b.name)
        if not b.uses():
            graph.initializers.pop(b.name)
        weights[packed.name] = Planned(planned.source, True, bits, scales.name, standard_ops, (k, n))
        count += 1
    if standard_ops:  # int4 tensors and block-wise DequantizeLinear need opset 21 and IR 10
        onnx_model.opset_imports[""] = max(onnx_model.opset_imports.get("", 0), 21)
        onnx_model.ir_version = max(onnx_model.ir_version or 0, 10)
    else:
        onnx_model.opset_imports["com.microsoft"] = 1
    return count


def _pending(name: str, dtype, shape: list[int]):
    """An initializer whose contents write_streamed supplies (nothing is allocated for it now)."""
    import onnx_ir as ir

    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                    const_value=ir.ExternalTensor("pending", 0, 0, dtype, shape=ir.Shape(shape), name=name))


def block_quantize(w: np.ndarray, bits: int, standard_ops: bool) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] weight -> (packed values, scales), symmetric, in ONNX Runtime's own kernels (the ones its
    MatMulNBitsQuantizer calls), so a streamed export quantizes exactly as a traced one does."""
    from onnxruntime.capi._pybind_state import (quantize_matmul_4bits, quantize_matmul_8bits,
                                                quantize_qdq_matmul_4bits)

    from .quantize import BLOCK

    k, n = w.shape
    blocks = -(-k // BLOCK)
    zero_points = np.zeros(n * blocks, dtype=np.uint8)  # symmetric: unused
    if standard_ops:
        packed = np.zeros((k * n + 1) // 2, dtype=np.uint8)
        scales = np.zeros((blocks, n), dtype=w.dtype)
        quantize_qdq_matmul_4bits(packed, w, scales, zero_points, BLOCK, n, k, True)
        return packed, scales
    if k % BLOCK:
        w = np.pad(w, ((0, blocks * BLOCK - k), (0, 0)))
    packed = np.zeros((n, blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=w.dtype)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, w, scales, zero_points, BLOCK, n, blocks * BLOCK, True)
    return packed, scales


def write_streamed(onnx_model, weights: dict, source, path: Path, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None, elsewhere: dict[str, str] | None = None) -> None:
    """Append every weight to path's external-data file, one tensor at a time, then save the graph.
    elsewhere: {initializer name: data file} for weights that go to another file of the folder (the
    embedding and LM head the drafter shares with the runtime)."""
    import onnx_ir as ir

    graph = onnx_model.graph
    files, offsets = {}, {}

    def append(name: str, data: np.ndarray) -> None:
        data_name = (elsewhere or {}).get(name, path.name + ".data")
        if data_name not in files:
            files[data_name] = open(path.parent / data_name, "wb")
            offsets[data_name] = 0
        f, offset = files[data_name], offsets[data_name]
        pad = -offset % ALIGNMENT
        f.write(b"\0" * pad)
        offset += pad
        f.write(data.data if data.size else b"")
        value = graph.initializers[name]
        value.const_value = ir.ExternalTensor(data_name, offset, data.nbytes, value.type.dtype,
                                              shape=value.shape, name=name, base_dir=path.parent)
        offsets[data_name] = offset + data.nbytes

    try:
        for i, (name, planned) in enumerate(weights.items()):
            tensor = source.get(planned.source)
            if planned.rows is not None:
                tensor = tensor[list(planned.rows)]
            shape = tuple(reversed(tensor.shape)) if planned.transposed else tuple(tensor.shape)
            expected = planned.shape if planned.bits else tuple(graph.initializers[name].shape)
            if shape != expected:
                raise UserError(f"{planned.source} has shape {tuple(tensor.shape)} in the checkpoint; the config "
                                f"implies {tuple(reversed(expected)) if planned.transposed else expected}")
            # One buffer in the export dtype, filled by a single cast-and-transpose copy, written as it is.
            out = torch.empty(shape, dtype=planned.dtype or dtype)
            out.copy_(tensor.t() if planned.transposed else tensor)
            del tensor
            if planned.bits:
                packed, scales = block_quantize(out.numpy(), planned.bits, planned.standard_ops)
                append(name, packed)
                append(planned.scales, scales)
            else:
                append(name, out.view(torch.uint8).numpy())
            del out
            if progress is not None:
                progress(i + 1, len(weights))
    finally:
        for f in files.values():
            f.close()
    ir.save(onnx_model, path)


def export_target_streamed(config, folder: Path, tap_layer_ids: list[int], qk_norm: bool, dtype: torch.dtype,
                           path: Path, exact_rows: bool = False, quantize: str | None = None,
                           standard_ops: bool = False, source=None,
                           progress: Callable[[int, int], None] | None = None) -> dict:
    """Write target.onnx (+ .data) for the checkpoint in `folder` without loading it; returns the IO names
    and how many products were quantized (int4 or int8 when `quantize` is given)."""
    from . import trace

    model = skeleton(config, tap_layer_ids, qk_norm, dtype)
    onnx_model, weights = trace_weightless(model, exact_rows)
    del model
    source = source or SafetensorsSource(folder)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = sorted({p.source for p in weights.values()} - source.names())
    if missing:
        raise UserError(f"{folder}: the checkpoint lacks {len(missing)} tensors the config implies "
                        f"(first: {missing[0]}){'; it ties the LM head to the embedding' if tied else ''}")
    quantized = quantize_products(onnx_model, weights, quantize, standard_ops) if quantize else 0
    write_streamed(onnx_model, weights, source, path, dtype, progress)
    inputs, outputs = trace.target_io_names(config.num_hidden_layers)
    return {"inputs": inputs, "outputs": outputs, "quantized": quantized}
