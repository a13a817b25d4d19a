"""The target exported without holding its weights: the same graph as the traced export, bit for bit, and
peak memory that does not grow with depth."""
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dflash_edge.bench.synthetic import save_target


def _feeds(session, vocab, seq=5, slots=12):
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64),
             "position_ids": np.arange(3, 3 + seq)[None].astype(np.int64),
             "logits_index": np.arange(seq).astype(np.int64)}
    for i in session.get_inputs()[3:]:
        feeds[i.name] = rng.standard_normal([d if isinstance(d, int) else slots for d in i.shape]).astype(np.float32)
    return feeds


@pytest.mark.parametrize("arch,exact_rows", [("llama", False), ("qwen3", True)])
def test_streamed_target_equals_the_traced_one(arch, exact_rows, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dflash_edge.export import trace
    from dflash_edge.export.modeling import load_target_from_hf
    from dflash_edge.export.streaming import export_target_streamed

    folder = save_target(tmp_path / "hf", arch)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():  # norms that differ from layer to layer (the random model's are all ones)
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf.to(torch.bfloat16).save_pretrained(folder)  # the source in its own dtype, as most checkpoints
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder)
    taps = [0, 2, 5]
    (tmp_path / "traced").mkdir()
    (tmp_path / "streamed").mkdir()
    trace.export_target(load_target_from_hf(hf, taps, qk_norm=arch == "qwen3"), tmp_path / "traced" / "target.onnx",
                        exact_rows=exact_rows)
    seen = []
    io = export_target_streamed(config, folder, taps, arch == "qwen3", torch.float32,
                                tmp_path / "streamed" / "target.onnx", exact_rows=exact_rows,
                                progress=lambda done, total: seen.append((done, total)))
    assert io.pop("quantized") == 0
    assert io == dict(zip(("inputs", "outputs"), trace.target_io_names(config.num_hidden_layers)))
    assert seen[-1][0] == seen[-1][1] and len(seen) == seen[-1][1]
    graphs = {k: onnx.load(str(tmp_path / k / "target.onnx"), load_external_data=False) for k in ("traced", "streamed")}
    assert Counter(n.op_type for n in graphs["traced"].graph.node) == Counter(
        n.op_type for n in graphs["streamed"].graph.node)
    # Every weight of the streamed graph lies in its external-data file, none inside the graph.
    external = [t for t in graphs["streamed"].graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    per_layer = 11 if arch == "qwen3" else 9  # 7 products, 2 norms (+ q/k norms)
    assert len(external) == per_layer * config.num_hidden_layers + (3 if arch == "qwen3" else 2)
    sessions = {k: ort.InferenceSession(str(tmp_path / k / "target.onnx")) for k in graphs}
    feeds = _feeds(sessions["traced"], config.vocab_size)
    for a, b in zip(sessions["traced"].run(None, feeds), sessions["streamed"].run(None, feeds)):
        assert np.array_equal(a, b)


def test_a_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path):
    from transformers import AutoConfig

    from dflash_edge.errors import UserError
    from dflash_edge.export.streaming import export_target_streamed

    folder = save_target(tmp_path / "hf", "llama", layers=2)
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = 3
    with pytest.raises(UserError, match="lacks 9 tensors"):
        export_target_streamed(config, folder, [0], False, torch.float32, tmp_path / "target.onnx")


PEAK = """
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig
from dflash_edge.export.streaming import export_target_streamed
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
export_target_streamed(AutoConfig.from_pretrained(folder), folder, [0, 1], False, torch.float32, out / "target.onnx")
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's resident size at fork (pytest's).
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({"peak_kb": int(status["VmHWM"].split()[0]),
                  "data_bytes": (out / "target.onnx.data").stat().st_size}))
"""


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """2 and 8 layers of 16 M parameters each: the six extra layers are 384 MB of fp32 output, and the
    streamed export's peak resident memory grows by a small fraction of that."""
    shape = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8)
    result = {}
    for layers in (2, 8):
        folder = save_target(tmp_path / f"hf{layers}", "llama", layers=layers, dtype=torch.bfloat16, sharp=False,
                             **shape)
        out = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(tmp_path / f"out{layers}")],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        result[layers] = json.loads(out.stdout.strip().splitlines()[-1])
    extra = result[8]["data_bytes"] - result[2]["data_bytes"]
    grown = (result[8]["peak_kb"] - result[2]["peak_kb"]) * 1024
    assert extra > 350e6
    assert grown < 0.15 * extra, (result, grown / 1e6, extra / 1e6)
