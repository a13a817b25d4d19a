"""Weight quantization of the target graph (int8, int8-tokens or int4).

DFlash stays exact on a quantized target only if a token's logits do not depend on the other tokens verified
with it. Per-tensor activation scales (quantize_dynamic) mix the tokens of a verify outright, so they are
never used. The two int8 kinds round activations to int8, which turns any difference between a verify's rows
and single steps into different tokens (1e-6 in fp32 became logits 1.1 apart), so they need a trace whose
rows are bit-identical to single steps (trace.EXACT_COLUMNS: the attention's values product in chunks). The
export checks rows against single steps past 256 slots whatever the kind (validate.check_rows_independent).

- int8: MatMulNBits (a Microsoft contrib op) with int8 compute (accuracy level 4): weights and each token's
  activations in blocks of 32. On 2 AVX2 cores SmolLM2 decodes plainly 1.3-1.4x faster than fp32, but the
  kernel is slow for many rows (a 16-token verify costs 4.4-5.6 steps), so DFlash gains little on it.
- int8-tokens: per-token int8, for DFlash on CPUs. Each token's activations get one scale (its largest
  magnitude), each weight column one scale; the products are ONNX's MatMulInteger (uint8 x uint8, summed in
  int32, so exact in any order) followed by the two scales. Activation outliers are first moved into the
  weights (smoothing.py), and the LM head is quantized too (a fifth of the bytes a decode step reads at
  fp32). Standard ONNX ops. Plain decoding as fast as int8, a verify much cheaper (DFlash's default loop
  1.3-1.4x its plain decoding where int8 gave 1.0-1.45x), a little further from fp32 (the greedy choice
  equals fp32's along fp32's replies at 97.3 / 95.8 % of positions against 98.8 / 97.7 % for int8;
  BENCHMARKS.md section 10).
- int4: MatMulNBits with fp32 compute (its int8-compute kernel differed by up to 1.0 from single steps
  even within 256 tokens); for TensorRT (standard ops only) a block-quantized DequantizeLinear (opset 21)
  feeding a plain MatMul, which TensorRT runs as an int4-weight GEMM ("explicit quantization").
MatMulNBits kinds quantize only the projections; the embedding table, and for int8 and int4 the LM head,
stay fp32 (the drafter uses them too). The drafter itself is small and stays in the export dtype.

A quantized target is a different target: plain decoding and DFlash on it agree token for token (the
runtime is the same), but both can differ from the fp32 model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUANTIZE = ("int8", "int8-tokens", "int4")
ROUNDS_ACTIVATIONS = ("int8", "int8-tokens")  # these need trace.export_target(exact_rows=True)
BLOCK = 32
NBITS = {"int8": (8, 4), "int4": (4, 1)}  # MatMulNBits: bits, accuracy level (4 = int8, 1 = fp32 compute)


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is a weight (an initializer)."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_target(path: Path, kind: str, standard_ops: bool = False) -> int:
    """Quantize path in place; returns how many products were quantized. standard_ops: DequantizeLinear
    + MatMul (TensorRT) instead of MatMulNBits (int4 only)."""
    if kind not in QUANTIZE:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZE)}")
    model = onnx.load(str(path))  # external data, if any, is read into memory here
    if not weight_matmuls(model):
        raise ValueError(f"{path.name} has no MatMul with a weight to quantize")
    if kind == "int8-tokens":
        count = per_token_int8(model)
    else:
        model, count = _matmul_nbits(model, kind, standard_ops)
    data = path.with_name(path.name + ".data")
    external = data.exists()  # the trace used external data (past protobuf's 2 GB); keep doing so
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=external, location=data.name)
    return count


def _matmul_nbits(model: onnx.ModelProto, kind: str, standard_ops: bool) -> tuple[onnx.ModelProto, int]:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    names = weight_matmuls(model)
    bits, level = NBITS[kind]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=True, accuracy_level=level,
                                     nodes_to_include=names, op_types_to_quantize=("MatMul",),
                                     quant_format=QuantFormat.QDQ if standard_ops else QuantFormat.QOperator)
    # The quantizer logs every node it visits at INFO (thousands of lines for a real model).
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level_before = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level_before)
    return quantizer.model.model, len(names)


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] fp32 -> uint8 values (zero point 128) and one fp32 scale per column, symmetric over +-127.

    uint8 rather than int8 weights: ONNX Runtime's x86 kernel for uint8 x int8 adds pairs of products in
    16 bits, which saturates on CPUs without VNNI (wrong sums, measured); uint8 x uint8 does not."""
    scale = np.maximum(np.abs(w).max(axis=0), np.float32(1e-30)) / np.float32(127)
    q = np.clip(np.rint(w / scale), -127, 127) + 128
    return q.astype(np.uint8), scale.astype(np.float32)


class _Graph:
    """Appends nodes and initializers with fresh names."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        self.count = 0

    def name(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"int8/{hint}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output


def per_token_int8(model: onnx.ModelProto) -> int:
    """Rewrite every weight MatMul, and the LM head's Gemm(transB=1), into per-token int8 products (module
    docstring), in place. Each activation is quantized once however many products read it (q, k and v
    share theirs). Returns the number of products rewritten."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    g = _Graph(model)
    tiny, q127, zero = g.const(np.array(1e-30, np.float32)), g.const(np.array(127, np.float32)), \
        g.const(np.array(128, np.uint8), "zero_point")
    offset, last_axis = g.const(np.array(128, np.float32)), g.const(np.array([-1], np.int64))
    quantized: dict[str, tuple[str, str]] = {}  # activation -> (uint8 values, per-token scale)

    def activation(x: str) -> tuple[str, str]:
        if x not in quantized:
            peak = g.op("ReduceMax", [g.op("Abs", [x]), last_axis], keepdims=1)
            scale = g.op("Div", [g.op("Max", [peak, tiny]), q127])  # [..., 1]: one per token
            values = g.op("Cast", [g.op("Add", [g.op("Round", [g.op("Div", [x, scale])]), offset])],
                          to=TensorProto.UINT8)
            quantized[x] = values, scale
        return quantized[x]

    def is_head(node) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return (node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in weights
                and attrs.get("transB") == 1 and not attrs.get("transA")
                and attrs.get("alpha", 1.0) == 1.0)

    count = 0
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            w = numpy_helper.to_array(weights[node.input[1]])
        elif is_head(node):
            w = numpy_helper.to_array(weights[node.input[1]]).T
        else:
            g.nodes.append(node)
            continue
        values, scale = activation(node.input[0])
        wq, wscale = quantize_columns(w.astype(np.float32))
        sums = g.op("MatMulInteger", [values, g.const(wq, "weight"), zero, zero])
        scaled = g.op("Mul", [g.op("Cast", [sums], to=TensorProto.FLOAT), g.const(wscale, "weight_scale")])
        g.op("Mul", [scaled, scale], output=node.output[0])
        count += 1
    used = {i for n in g.nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(g.nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + g.initializers)
    return count
