"""Per-token int8 (export/quantize.py) and the smoothing before it (export/smoothing.py)."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dflash_edge.export.quantize import per_token_int8, quantize_columns


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _two_products(w1: np.ndarray, w2: np.ndarray, head: np.ndarray) -> onnx.ModelProto:
    """x -> (x @ w1, x @ w2) summed -> Gemm(transB=1) with head: two products that share one input."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["h"]),
             helper.make_node("Gemm", ["h", "head"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", w1.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (head, "head"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_per_token_int8_is_close_to_fp32_and_each_row_is_its_own():
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((64, 48)).astype(np.float32) for _ in range(2))
    head = rng.standard_normal((100, 48)).astype(np.float32)
    model = _two_products(w1, w2, head)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    x[2, 5] = 40.0  # an outlier in one token must not coarsen the other tokens' rounding
    reference = _session(model).run(None, {"x": x})[0]
    assert per_token_int8(model) == 3
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 3 and "Gemm" not in ops and "MatMul" not in ops
    assert ops.count("ReduceMax") == 2  # x quantized once for both of its products, h once
    session = _session(model)
    out = session.run(None, {"x": x})[0]
    rows = [np.abs(out[i] - reference[i]).max() / np.abs(reference[i]).max() for i in range(len(x))]
    assert max(rows[:2] + rows[3:]) < 0.03 and rows[2] < 0.2
    alone = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert np.array_equal(out, alone)  # bit for bit: DFlash's verify equals single steps


def test_int8_weights_never_saturate_the_integer_sums():
    # Full-range weights and activations: the product must be the exact integer sum. (uint8 x int8 on x86
    # without VNNI adds pairs in 16 bits and returned sums off by millions here.)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 32)).astype(np.float32)
    w[:, 0] = 1.0  # every weight of column 0 rounds to +127
    values, scale = quantize_columns(w)
    assert values[:, 0].min() == 255 and np.allclose(scale[0], 1 / 127)
    nodes = [helper.make_node("MatMulInteger", ["a", "w", "z", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                              [numpy_helper.from_array(values, "w"), numpy_helper.from_array(np.array(128, np.uint8), "z")])
    a = rng.integers(0, 256, (4, 256)).astype(np.uint8)
    a[0] = 255
    y = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])).run(None, {"a": a})[0]
    assert np.array_equal(y, (a.astype(np.int64) - 128) @ (values.astype(np.int64) - 128))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_smoothing_leaves_the_fp32_model_unchanged(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflash_edge.bench.synthetic import save_target
    from dflash_edge.export.modeling import load_target_from_hf
    from dflash_edge.export.smoothing import input_peaks, smooth
    from dflash_edge.export.validate import Report, check_module

    folder = save_target(tmp_path / "hf", arch)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    target = load_target_from_hf(hf, [0, 1], qk_norm=arch == "qwen3")
    peaks = input_peaks(hf, tokenizer, ["the cat sat on the mat", "def f(x): return x + 1"])
    assert len(peaks) == 7 * hf.config.num_hidden_layers
    before = copy.deepcopy(target)
    smooth(target, peaks)
    layer, old = target.layers[0], before.layers[0]
    assert not torch.equal(layer.input_layernorm.weight, old.input_layernorm.weight)
    assert not torch.equal(layer.self_attn.v_proj.weight, old.self_attn.v_proj.weight)
    report = Report(1e-4)
    with torch.no_grad():
        check_module(target, hf, report)
    assert report.ok, report.lines()
