"""Two probes for the GPU script, not part of the loop: what a GPU run should find out besides the tables.

    python -m dflash_edge.bench.gpu_probes cuda-graph --model DIR [--json PATH]
    python -m dflash_edge.bench.gpu_probes tensorrt --model DIR [--json PATH]

cuda-graph: can ONNX Runtime replay the target's decode step as a CUDA graph here, and what would it save?
It decodes the same greedy steps twice after one prefill: through the runtime's usual IOBinding path, and
through a second target session created with `enable_cuda_graph`, every input and output bound to a fixed
device buffer (ORT captures on the first run and replays after; the inputs change in place). It reports
whether ORT accepted the capture (and its error when not: a graph whose shape arithmetic ORT places on
the CPU cannot be captured), whether both paths chose the same tokens, and the median step time of each.

tensorrt: TensorRT's first-run engine build and later engine-cache load. DIR is an export made with
--variant tensorrt. Each run loads the folder under the TensorRT provider in a fresh process and decodes a
few tokens (TensorRT may build an engine at load or at the first call): the first run starts from an empty
engine cache (DFLASH_EDGE_CACHE points at a new folder), the second finds the engines the first one wrote.
It also reports whether the tokens equal plain CPU decoding of the same export (fp16 kernels differ
between providers, so a difference there is a fact, not a failure; DFlash's exactness on TensorRT is
DFlash against plain decoding on TensorRT).

Without the provider a probe needs, it says so and exits 0, so the script's dry run passes through it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def cuda_graph(folder: str, steps: int = 64) -> dict:
    import onnxruntime as ort

    from ..runtime.model import ExportedModel
    from ..runtime.session import make_session

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"captured": False, "error": "CUDAExecutionProvider is not available (a CPU-only onnxruntime)"}
    model = ExportedModel(folder, "cuda", load_drafter=False)
    prompt = list(range(100, 164))

    def fresh_cache():
        cache = model.new_target_cache(len(prompt) + steps + 1)
        first, _ = model.prefill(prompt, cache)
        return cache, int(first.next_ids[-1])

    cache, token = fresh_cache()
    plain_ids, plain_ms = [], []
    for _ in range(steps):
        t = time.perf_counter()
        token = int(model.run_target([token], cache, last_only=True).next_ids[0])
        plain_ms.append((time.perf_counter() - t) * 1e3)
        cache.commit(1)
        plain_ids.append(token)
    result = {"steps": steps, "plain_step_ms": round(statistics.median(plain_ms), 3)}

    cache, token = fresh_cache()
    t = model.target_info
    try:
        session = make_session(model.folder / t["graph"], [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}),
                                                           "CPUExecutionProvider"], model.shared)
        fixed = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=np.int64), "cuda", 0)
                 for name, shape in (("input_ids", (1, 1)), ("position_ids", (1, 1)), ("logits_index", (1,)))}
        next_ids = ort.OrtValue.ortvalue_from_shape_and_type((1, 1), np.int64, "cuda", 0)
        binding = session.io_binding()
        for name, value in fixed.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output("next_token_ids", next_ids)
        width = len(t["tap_layer_ids"]) * t["hidden_size"]
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_shape_and_type(
            (1, 1, t["vocab_size"]), np.float32, "cuda", 0))
        binding.bind_ortvalue_output("aux_hidden_states", ort.OrtValue.ortvalue_from_shape_and_type(
            (1, 1, width), np.float32, "cuda", 0))
        cache.bind(binding, model.past_names, model.present_names)
        graph_ids, graph_ms = [], []
        for _ in range(steps):
            start = time.perf_counter()
            fixed["input_ids"].update_inplace(np.array([[token]], dtype=np.int64))
            fixed["position_ids"].update_inplace(np.array([[cache.length]], dtype=np.int64))
            session.run_with_iobinding(binding)
            token = int(next_ids.numpy()[0, 0])
            graph_ms.append((time.perf_counter() - start) * 1e3)
            cache.commit(1)
            graph_ids.append(token)
    except Exception as e:  # ORT reports a refused capture as one of several exception types
        result.update(captured=False, error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        return result
    result.update(captured=True, error=None, same_tokens=graph_ids == plain_ids,
                  graph_step_ms=round(statistics.median(graph_ms[1:]), 3))  # the first run captures
    return result


RUN = """
import sys
from dflash_edge.runtime.api import DFlashModel
m = DFlashModel(sys.argv[1], sys.argv[2])
print(" ".join(map(str, m.generate("Write a haiku about caches.", max_new_tokens=16, block_size=1).token_ids)))
"""


def timed_run(folder: str, provider: str, cache: str) -> tuple[float, list[int]]:
    env = {**os.environ, "DFLASH_EDGE_CACHE": cache}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUN, folder, provider], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["failed"])[-1])
    return time.perf_counter() - t, [int(x) for x in out.stdout.split()]


def tensorrt(folder: str) -> dict:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return {"available": False, "why": "TensorrtExecutionProvider is not available in this onnxruntime"}
    with tempfile.TemporaryDirectory() as cache:
        try:
            build_s, tokens = timed_run(folder, "tensorrt", cache)
            load_s, again = timed_run(folder, "tensorrt", cache)
            _, reference = timed_run(folder, "cpu", cache)
        except RuntimeError as e:
            return {"available": True, "error": str(e)}
    return {"available": True, "first_run_s": round(build_s, 2), "cached_run_s": round(load_s, 2),
            "same_tokens_as_cpu": tokens == again == reference}


PROBES = {"cuda-graph": cuda_graph, "tensorrt": tensorrt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=sorted(PROBES))
    p.add_argument("--model", required=True, help="an exported folder")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    line = json.dumps(PROBES[args.probe](args.model))
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
