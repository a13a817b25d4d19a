"""Decode-step attention products of SmolLM2-135M (30 layers, 3 KV heads x 3 query heads, head dim 64) in
ONNX Runtime's CPU provider, one graph per cache layout, at 128 and 2,048 cache slots. The difference
between the two is what a decode step's cost grows by with context (BENCHMARKS.md, sections 3 and 7).

    python benchmarks/attention_layouts.py [cache-left query-left per-head] [--threads 2]

cache-left: the exported graphs' layout (keys [kv, slots, d] and values transposed [kv, d, slots] on the
left of both products, each head's products halved so that two threads share three heads evenly).
query-left: the query on the left of keys stored transposed and of values as they are.
per-head: one matrix-vector product per query head over keys stored transposed.
Each layout runs alone, several times, so that one layout's cache traffic does not land on another's.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

LAYERS, KV, GROUPS, DIM = 30, 3, 3, 64


class Graph:
    def __init__(self):
        self.nodes, self.inputs, self._n = [], [], 0

    def name(self) -> str:
        self._n += 1
        return f"t{self._n}"

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def reshape(self, x: str, shape: list[int]) -> str:
        const = self.name()
        self.nodes.append(helper.make_node("Constant", [], [const], value=helper.make_tensor(
            const + "_value", TensorProto.INT64, [len(shape)], shape)))
        return self.op("Reshape", x, const)

    def input(self, shape: list[int]) -> str:
        name = f"cache{len(self.inputs)}"
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name


def layer(g: Graph, layout: str, q: str, slots: int) -> str:
    """One layer's scores, softmax and weighted values; returns [1, KV, GROUPS * DIM] values in any order."""
    if layout == "cache-left":
        keys, values_t = g.input([1, KV, slots, DIM]), g.input([1, KV, DIM, slots])
        q_t = g.op("Transpose", g.reshape(q, [1, KV, 1, GROUPS, DIM]), perm=[0, 1, 2, 4, 3])
        scores = g.op("MatMul", g.reshape(keys, [1, KV, 2, slots // 2, DIM]), q_t)
        scores = g.op("Transpose", g.reshape(scores, [1, KV, slots, GROUPS]), perm=[0, 1, 3, 2])
        probs = g.op("Softmax", scores, axis=-1)
        probs_t = g.op("Transpose", g.reshape(probs, [1, KV, 1, GROUPS, slots]), perm=[0, 1, 2, 4, 3])
        out = g.op("MatMul", g.reshape(values_t, [1, KV, 2, DIM // 2, slots]), probs_t)
    elif layout == "query-left":
        keys_t, values = g.input([1, KV, DIM, slots]), g.input([1, KV, slots, DIM])
        probs = g.op("Softmax", g.op("MatMul", g.reshape(q, [1, KV, GROUPS, DIM]), keys_t), axis=-1)
        out = g.op("MatMul", probs, values)
    elif layout == "per-head":
        keys_t, values = g.input([1, KV, DIM, slots]), g.input([1, KV, slots, DIM])
        q_rows = g.reshape(q, [1, KV, GROUPS, 1, DIM])
        scores = g.op("MatMul", q_rows, g.reshape(keys_t, [1, KV, 1, DIM, slots]))
        out = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.reshape(values, [1, KV, 1, slots, DIM]))
    else:
        raise SystemExit(f"unknown layout {layout!r}: cache-left, query-left or per-head")
    return g.reshape(out, [1, KV, GROUPS * DIM])


def build(layout: str, slots: int) -> bytes:
    g = Graph()
    q = "q"
    total = None
    for _ in range(LAYERS):
        # Summing every layer's output keeps all of them live without chaining them.
        out = g.op("ReduceSum", layer(g, layout, q, slots), keepdims=0)
        total = out if total is None else g.op("Add", total, out)
    graph = helper.make_graph(g.nodes, layout, [helper.make_tensor_value_info(q, TensorProto.FLOAT,
                                                                              [1, KV * GROUPS, 1, DIM])] + g.inputs,
                              [helper.make_tensor_value_info(total, TensorProto.FLOAT, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def time_layout(layout: str, slots: int, threads: int, calls: int = 30) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(build(layout, slots), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    binding = session.io_binding()
    for spec in session.get_inputs():
        binding.bind_ortvalue_input(spec.name, ort.OrtValue.ortvalue_from_numpy(
            rng.standard_normal(spec.shape, dtype=np.float32)))
    binding.bind_output(session.get_outputs()[0].name)
    for _ in range(5):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("layouts", nargs="*", default=["cache-left", "query-left", "per-head"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    for layout in args.layouts:
        for _ in range(args.repeats):
            short, long = time_layout(layout, 128, args.threads), time_layout(layout, 2048, args.threads)
            print(f"{layout:10s}  128 slots {short:6.2f} ms  2,048 slots {long:6.2f} ms  growth +{long - short:.2f} ms")


if __name__ == "__main__":
    main()
