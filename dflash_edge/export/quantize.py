"""Weight quantization of the target graph with ONNX Runtime's tools (int8 or int4).

Weights only: block-wise (32 per block, symmetric). For ONNX Runtime's own providers each weight MatMul
becomes a MatMulNBits (a Microsoft contrib op) that dequantizes and multiplies in fp32 (accuracy level
1). For TensorRT (standard ops only) it becomes a block-quantized DequantizeLinear (opset 21) feeding a
plain MatMul, which TensorRT runs as an int4-weight GEMM ("explicit quantization"). Quantizing activations as well (quantize_dynamic, or MatMulNBits' int8 compute) picks one scale per
tensor or block of tokens, so a token's logits would depend on the other tokens verified with it, and
DFlash would no longer reproduce plain decoding token for token. Only the projections are quantized,
the MatMuls with a weight: attention stays fp32, and so do the embedding table and the LM head, which the
drafter shares. The drafter itself is small and stays in the export dtype.

A quantized target is a different target: plain decoding and DFlash on it agree token for token (the
runtime is the same), but both can differ from the fp32 model.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

BITS = {"int8": 8, "int4": 4}
QUANTIZE = tuple(BITS)
BLOCK = 32


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
    quantizer = MatMulNBitsQuantizer(model, bits=BITS[kind], block_size=BLOCK, is_symmetric=True, accuracy_level=1,
                                     nodes_to_include=names, op_types_to_quantize=("MatMul",),
                                     quant_format=QuantFormat.QDQ if standard_ops else QuantFormat.QOperator)
    quantizer.process()
    model = quantizer.model.model
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=external, location=data.name)
    return len(names)
