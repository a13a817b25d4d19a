"""Providers by name: clear errors, the CPU fallback, and TensorRT options that fit the graphs."""
import subprocess
import sys

import onnx
import pytest

from dflash_edge.errors import UserError
from dflash_edge.runtime.providers import (PROVIDERS, check_started, provider_options, resolve_providers,
                                           tensorrt_profiles)


def test_unavailable_provider_is_one_line_unless_fallback():
    # This test environment has the CPU-only onnxruntime wheel.
    with pytest.raises(UserError, match="not available.*--fallback cpu"):
        resolve_providers("cuda")
    assert resolve_providers("cuda", fallback=True) == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="unknown provider 'metal'"):
        resolve_providers("metal")


def test_a_provider_that_fails_to_start_is_reported_not_hidden():
    class QuietFallback:  # what ORT returns when the CUDA libraries are missing: a CPU-only session
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(UserError, match="cuda failed to start.*cuDNN.*--fallback cpu"):
        check_started(QuietFallback(), PROVIDERS["cuda"], fallback=False, graph="target.onnx")
    check_started(QuietFallback(), PROVIDERS["cuda"], fallback=True, graph="target.onnx")


def test_generate_cli_falls_back_to_cpu_only_when_asked(tiny_llama):
    _, _, out = tiny_llama
    cmd = [sys.executable, "-m", "dflash_edge.runtime.cli", "--model", str(out), "--raw", "--max-new-tokens", "4",
           "the cat", "--provider", "cuda"]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "--fallback cpu" in refused.stderr and "Traceback" not in refused.stderr
    ran = subprocess.run(cmd + ["--fallback", "cpu"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr


def _dynamic_inputs(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            for i in graph.input}


def _parse(profile: str) -> dict[str, list[int]]:
    return {name: [int(x) for x in dims.split("x")] for name, dims in (p.split(":") for p in profile.split(","))}


@pytest.mark.parametrize("graph", ["target.onnx", "drafter_context.onnx", "drafter_block.onnx"])
def test_tensorrt_profiles_cover_every_dynamic_input_within_the_graph_shapes(tiny_llama, graph):
    import json

    _, _, out = tiny_llama
    manifest = json.loads((out / "dflash_edge.json").read_text())
    profiles = tensorrt_profiles(manifest, graph)
    low, opt, high = (_parse(profiles[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
    inputs = _dynamic_inputs(out / graph)
    dynamic = {name for name, dims in inputs.items() if None in dims}
    assert set(low) == set(opt) == set(high) == dynamic
    for name in dynamic:
        dims = inputs[name]
        assert len(low[name]) == len(dims)
        for fixed, a, b, c in zip(dims, low[name], opt[name], high[name]):
            assert 1 <= a <= b <= c
            if fixed is not None:
                assert a == b == c == fixed, name
    if graph == "target.onnx":
        # The cache buffers of a full context, and a verify block, fit the largest shapes.
        assert high["past_key_values.0.key"][2] >= manifest["target"]["max_context"]
        assert opt["input_ids"][1] == manifest["drafter"]["block_size"]


def test_provider_options_add_tensorrt_settings_only_for_tensorrt(tiny_llama, tmp_path, monkeypatch):
    import json

    _, _, out = tiny_llama
    manifest = json.loads((out / "dflash_edge.json").read_text())
    cpu = ["CPUExecutionProvider"]
    assert provider_options(cpu, out, manifest, "target.onnx") == cpu
    monkeypatch.setenv("DFLASH_EDGE_CACHE", str(tmp_path))
    trt = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                           out, manifest, "target.onnx")
    name, options = trt[0]
    assert name == "TensorrtExecutionProvider" and trt[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_path"].startswith(str(tmp_path)) and (tmp_path / "tensorrt").is_dir()
    assert options["trt_fp16_enable"] == "False"  # an fp32 export stays fp32


def test_prefill_in_pieces_gives_the_same_tokens(tiny_llama):
    """TensorRT bounds one call's length; a prompt prefilled in pieces must decode exactly the same."""
    from dflash_edge.runtime.generate import generate
    from dflash_edge.runtime.model import ExportedModel

    model = ExportedModel(tiny_llama[2])
    model.stop_token_ids = set()
    ids = model.tokenizer.encode("the cat sat on the mat and the dog ran to the big red mat")
    whole = [generate(model, ids, 24, block_size=b)[0] for b in (1, 8)]
    model.prefill_chunk = 5
    assert [generate(model, ids, 24, block_size=b)[0] for b in (1, 8)] == whole


def test_the_engine_cache_path_takes_nothing_but_the_date_from_the_manifest(tmp_path, monkeypatch):
    """Security review L13: a hostile 'created' cannot steer the cache path out of its folder."""
    from dflash_edge.runtime.providers import engine_cache_dir

    monkeypatch.setenv("DFLASH_EDGE_CACHE", str(tmp_path))
    hostile = engine_cache_dir(tmp_path / "model", {"export": {"created": "../../../etc/x\x00"}})
    assert hostile.parent == tmp_path / "tensorrt" and "/" not in hostile.name and ".." not in hostile.name
    a = engine_cache_dir(tmp_path / "model", {"export": {"created": "2026-12-03T10:00:00Z"}, "target": {"x": 1}})
    b = engine_cache_dir(tmp_path / "model", {"export": {"created": "2026-12-03T10:00:00Z"}, "target": {"x": 2}})
    assert a != b and a.name.startswith("model-2026-12-03T100000Z-")
