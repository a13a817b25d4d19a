"""Weight quantization of the target graph with ONNX Runtime's tools (int8 or int4).

Weights block-wise (32 per block, symmetric). For ONNX Runtime's own providers each weight MatMul becomes
a MatMulNBits (a Microsoft contrib op); for TensorRT (standard ops only) a block-quantized
DequantizeLinear (opset 21) feeding a plain MatMul, which TensorRT runs as an int4-weight GEMM ("explicit
quantization"). Only the projections are quantized, the MatMuls with a weight: attention stays fp32, and
so do the embedding table and the LM head, which the drafter shares. The drafter itself is small and
stays in the export dtype.

DFlash stays exact on a quantized target only if a token's logits do not depend on the other tokens verified
with it. Per-tensor activation scales (quantize_dynamic) mix the tokens of a verify outright, so they are
never used. int8 runs MatMulNBits' int8 compute (accuracy level 4): each token's activations are rounded
to int8 on their own (one scale per token and block of 32); on 2 AVX2 cores it decodes plainly 1.26-1.44x
faster than fp32 (a 16-token verify is slow, 5.6 steps), where the fp32-compute kernel of int8 weights
(level 1) was 7-9x slower than fp32.
Rounding activations turns any difference between a verify's rows and single steps into different tokens
(1e-6 in fp32 became logits 1.1 apart), so it needs the graph's rows to be bit-identical to single steps,
which the attention's chunked values product gives (trace.EXACT_COLUMNS). int4 keeps fp32 compute: its
int8-compute kernel differed by up to 1.0 from single steps even within 256 tokens. The export checks rows
against single steps past 256 slots whatever the kind (validate.check_rows_independent).

A quantized target is a different target: plain decoding and DFlash on it agree token for token (the
runtime is the same), but both can differ from the fp32 model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

BITS = {"int8": 8, "int4": 4}
QUANTIZE = tuple(BITS)
BLOCK = 32
ACCURACY_LEVEL = {"int8": 4, "int4": 1}  # MatMulNBits: 4 = int8 compute, 1 = fp32 compute (module docstring)


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is a weight (an initializer)."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_target(path: Path, kind: str, standard_ops: bool = False) -> int:
    """Quantize path in place; returns how many MatMuls were quantized. standard_ops: DequantizeLinear
    + MatMul (TensorRT) instead of MatMulNBits."""
    if kind not in QUANTIZE:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZE)}")
    model = onnx.load(str(path))  # external data, if any, is read into memory here
    names = weight_matmuls(model)
    if not names:
        raise ValueError(f"{path.name} has no MatMul with a weight to quantize")
    data = path.with_name(path.name + ".data")
    external = data.exists()  # the trace used external data (past protobuf's 2 GB); keep doing so
    quantizer = MatMulNBitsQuantizer(model, bits=BITS[kind], block_size=BLOCK, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL[kind],
                                     nodes_to_include=names, op_types_to_quantize=("MatMul",),
                                     quant_format=QuantFormat.QDQ if standard_ops else QuantFormat.QOperator)
    # The quantizer logs every node it visits at INFO (thousands of lines for a real model).
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    model = quantizer.model.model
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=external, location=data.name)
    return len(names)
