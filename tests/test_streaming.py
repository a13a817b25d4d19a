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


@pytest.mark.parametrize("arch,kind,standard_ops,dtype", [("llama", "int4", False, torch.float32),
                                                          ("qwen3", "int8", False, torch.float32),
                                                          ("llama", "int4", True, torch.float16)])
def test_weights_quantized_one_at_a_time_equal_the_whole_graph_quantized(arch, kind, standard_ops, dtype, tmp_path):
    """Per tensor while streaming (MatMulNBits, or DequantizeLinear for TensorRT) gives the graph that
    quantizing the traced export afterwards gives: every output bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dflash_edge.export import trace
    from dflash_edge.export.modeling import load_target_from_hf
    from dflash_edge.export.quantize import quantize_target
    from dflash_edge.export.streaming import export_target_streamed

    folder = save_target(tmp_path / "hf", arch, hidden_size=128, intermediate_size=256)
    config = AutoConfig.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    qwen3, exact = arch == "qwen3", kind == "int8"
    for name in ("traced", "streamed"):
        (tmp_path / name).mkdir()
    trace.export_target(load_target_from_hf(hf, [0, 5], qk_norm=qwen3).to(dtype), tmp_path / "traced" / "target.onnx",
                        exact_rows=exact)
    expected = quantize_target(tmp_path / "traced" / "target.onnx", kind, standard_ops=standard_ops)
    io = export_target_streamed(config, folder, [0, 5], qwen3, dtype, tmp_path / "streamed" / "target.onnx",
                                exact_rows=exact, quantize=kind, standard_ops=standard_ops)
    assert io["quantized"] == expected == 7 * config.num_hidden_layers
    ops = {n.op_type for n in onnx.load(str(tmp_path / "streamed" / "target.onnx"), load_external_data=False).graph.node}
    assert ("DequantizeLinear" in ops and "MatMulNBits" not in ops) if standard_ops else "MatMulNBits" in ops
    sessions = {k: ort.InferenceSession(str(tmp_path / k / "target.onnx")) for k in ("traced", "streamed")}
    feeds = _feeds(sessions["traced"], config.vocab_size)
    if dtype == torch.float16:
        feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    for a, b in zip(sessions["traced"].run(None, feeds), sessions["streamed"].run(None, feeds)):
        assert np.array_equal(a, b)


def test_rotary_frequencies_stay_fp32_in_an_fp16_module():
    """Rounded to fp16 they put position 1,000 half a radian off (the traced fp16 export did so)."""
    from dflash_edge.export.modeling import Rotary

    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, 64, 2) / 64))).to(torch.float16)
    assert rotary.inv_freq.dtype == torch.float32
    cos, _ = rotary(torch.tensor([[1000]]), torch.float32)
    exact = torch.cos(1000 * (1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))))
    assert torch.allclose(cos[0, 0, 0, :32].double(), exact, atol=1e-3)


def _quiet_export(folder, out, **kwargs):
    from dflash_edge.export.pipeline import export

    return export(str(folder), str(out), drafter="", log=lambda *a: None, **kwargs)


def test_a_bf16_export_is_validated_through_its_fp32_twin_and_refused_on_the_cpu(tmp_path):
    from dflash_edge.errors import UserError
    from dflash_edge.runtime.model import ExportedModel

    folder = save_target(tmp_path / "hf", "qwen3", dtype=torch.bfloat16)
    out = _quiet_export(folder, tmp_path / "out", dtype="bf16")
    manifest = json.loads((out / "dflash_edge.json").read_text())
    assert manifest["target"]["dtype"] == "bf16"
    checks = manifest["export"]["validation"]
    assert checks["first 2 layers (fp32):logits"]["ok"] and checks["target:onnx checker"]["ok"]
    graph = onnx.load(str(out / "target.onnx"), load_external_data=False).graph
    kinds = {t.data_type for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert kinds == {onnx.TensorProto.BFLOAT16}
    with pytest.raises(UserError, match="bf16.*CPU provider cannot run"):
        ExportedModel(out)


def test_validating_the_first_layers_catches_weights_in_the_wrong_place(tmp_path, monkeypatch):
    """Swap two projections of one layer in the mapping from graph to checkpoint: the first-layers check
    must fail (it reads the checkpoint through transformers' names, not through that mapping)."""
    from dflash_edge.export import streaming
    from dflash_edge.export.pipeline import ValidationFailed

    folder = save_target(tmp_path / "hf", "llama")
    assert _quiet_export(folder, tmp_path / "good", validate="layers").is_dir()
    right = streaming.source_name
    swap = {"up_proj": "gate_proj", "gate_proj": "up_proj"}

    def wrong(name):
        src = right(name)
        if ".layers.1.mlp." in src:
            kind = src.split(".")[-2]
            src = src.replace(kind, swap.get(kind, kind))
        return src

    monkeypatch.setattr(streaming, "source_name", wrong)
    with pytest.raises(ValidationFailed):
        _quiet_export(folder, tmp_path / "bad", validate="layers")
    assert not (tmp_path / "bad").exists()


def test_an_export_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    from dflash_edge.errors import UserError
    from dflash_edge.export import budget

    folder = save_target(tmp_path / "hf", "llama")
    monkeypatch.setattr(budget, "available_memory", lambda: 50e6)
    with pytest.raises(UserError, match=r"needs about \d+\.\d GB of memory .* 0\.1 GB is available"):
        _quiet_export(folder, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written, not even a partial folder


def test_the_estimates_match_what_the_issue_measured_and_asks():
    """The loaded path's 1.07 B Llama (measured 11.6 GB) and the streamed 8B shapes' budgets."""
    from types import SimpleNamespace

    from dflash_edge.bench.synthetic import LLAMA31_8B
    from dflash_edge.export.budget import Shape, estimate

    one_b = Shape.of(SimpleNamespace(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True))
    assert 1.0e9 < one_b.params() < 1.1e9
    assert 10e9 < estimate(one_b, "fp32", None, streamed=False, validate_layers=0).memory < 13e9
    assert estimate(one_b, "fp16", None, streamed=True, validate_layers=2).memory < 4e9
    eight_b = Shape.of(SimpleNamespace(**LLAMA31_8B, tie_word_embeddings=False))
    assert 7.9e9 < eight_b.params() < 8.1e9
    for dtype, quantize in (("fp32", "int4"), ("fp16", None), ("fp16", "int4")):
        need = estimate(eight_b, dtype, quantize, streamed=True, validate_layers=2)
        assert need.memory < 8e9


def test_a_disk_that_fills_up_mid_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from dflash_edge.errors import UserError
    from dflash_edge.export import streaming

    folder = save_target(tmp_path / "hf", "llama", layers=4)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming, "write_streamed", full)
    with pytest.raises(UserError, match="filled up during the export"):
        _quiet_export(folder, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
