"""Providers by name: clear errors, the CPU fallback, and TensorRT options that fit the graphs."""
import logging
import subprocess
import sys
from pathlib import Path, PurePosixPath

import onnx
import pytest

from dflash_edge.errors import UserError
from dflash_edge.runtime import providers
from dflash_edge.runtime.providers import (PROVIDERS, check_started, provider_options, resolve_providers,
                                           tensorrt_profiles)

ROOT = Path(__file__).resolve().parents[1]


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


# GPU start-up without a GPU (review F2, F3, F15, F17): each check gets the facts a GPU machine would give.

class FakeDist:
    """What importlib.metadata gives for one installed distribution."""

    def __init__(self, name, top="onnxruntime\n", files=()):
        self.metadata = {"Name": name}
        self.top = top
        self.files = [PurePosixPath(f) for f in files]

    def read_text(self, filename):
        return self.top if filename == "top_level.txt" else None


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))


@pytest.fixture
def records():
    handler = Records()
    providers.log.addHandler(handler)
    yield handler.messages
    providers.log.removeHandler(handler)


def _installed(monkeypatch, *dists):
    monkeypatch.setattr(providers.metadata, "distributions", lambda: list(dists))


def test_only_distributions_that_ship_the_onnxruntime_package_count():
    dists = [FakeDist("onnxruntime"), FakeDist("onnxruntime_gpu"), FakeDist("numpy"),
             FakeDist("onnxruntime-genai", top="onnxruntime_genai\n"),
             FakeDist("onnxruntime-directml", top=None, files=["onnxruntime/__init__.py"]),
             FakeDist("onnxruntime-extensions", top=None, files=["onnxruntime_extensions/__init__.py"])]
    assert providers.runtime_wheels(dists) == ["onnxruntime", "onnxruntime-directml", "onnxruntime-gpu"]
    assert providers.runtime_wheels([FakeDist("onnxruntime")]) == ["onnxruntime"]


def test_both_runtime_wheels_are_one_line_naming_the_fix(monkeypatch, records):
    _installed(monkeypatch, FakeDist("onnxruntime"), FakeDist("onnxruntime-gpu"))
    for name in ("cuda", "tensorrt"):
        with pytest.raises(UserError) as e:
            resolve_providers(name)
        message = str(e.value)
        assert "onnxruntime and onnxruntime-gpu are installed together" in message and "\n" not in message
        assert "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu" in message
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]  # the CPU provider works from either build
    assert records == []
    # --fallback cpu keeps running (this wheel has no CUDA) and says why the GPU was not used.
    assert resolve_providers("cuda", fallback=True) == ["CPUExecutionProvider"]
    assert [level for level, m in records if "installed together" in m] == [logging.WARNING]


def test_one_runtime_wheel_is_not_a_clash(monkeypatch):
    _installed(monkeypatch, FakeDist("onnxruntime"), FakeDist("onnxruntime-genai", top="onnxruntime_genai"))
    with pytest.raises(UserError, match="not available.*dflash-edge\\[gpu\\].*--fallback cpu"):
        resolve_providers("cuda")


def test_a_missing_runtime_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` does when it is absent
    _installed(monkeypatch)
    with pytest.raises(providers.MissingRuntime) as e:
        providers._import_onnxruntime()
    assert isinstance(e.value, UserError) and isinstance(e.value, ImportError)
    assert "onnxruntime is not installed: pip install 'dflash-edge[cpu]'" in str(e.value)
    assert "samples/jetson" in str(e.value) and "\n" not in str(e.value)
    # Installed but unimportable: two wheels that removed each other's files.
    _installed(monkeypatch, FakeDist("onnxruntime-gpu"))
    with pytest.raises(providers.MissingRuntime, match="broken.*pip uninstall -y onnxruntime-gpu &&"):
        providers._import_onnxruntime()


def test_a_cuda_13_wheel_that_cannot_import_names_the_library():
    """onnxruntime-gpu 1.27.0 links libcudart.so.13 into its Python module (microsoft/onnxruntime#29500)."""
    error = ImportError("libcudart.so.13: cannot open shared object file: No such file or directory")
    message = providers.import_failure(error, ["onnxruntime-gpu"])
    assert message.startswith("import onnxruntime failed: libcudart.so.13 not found")
    assert "'onnxruntime-gpu[cuda,cudnn]'" in message and "older than 580" in message
    own = ImportError("libonnxruntime.so.1.31.1: cannot open shared object file: No such file or directory")
    assert "the install is broken" in providers.import_failure(own, ["onnxruntime-gpu"])


def _tiny_graph(path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [1.0] * 16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"),
             helper.make_node("Relu", ["m"], ["y"], name="act")]
    graph = helper.make_graph(nodes, "tiny", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_preload_dlls_runs_once_before_the_first_gpu_session(tmp_path, monkeypatch, capsys):
    from dflash_edge.runtime.session import make_session

    graph = _tiny_graph(tmp_path / "tiny.onnx")
    events = []
    real = providers.ort.InferenceSession

    def preload_dlls():
        events.append("preload")
        print("Failed to load libcudnn.so.9")  # what ORT prints; stdout is --json's, so it must not leak

    def session(*args, **kwargs):
        events.append("session")
        return real(*args, **kwargs)

    monkeypatch.setattr(providers, "_preloaded", False)
    monkeypatch.setattr(providers.ort, "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(providers.ort, "InferenceSession", session)
    make_session(graph, ["CPUExecutionProvider"])
    assert events == ["session"]  # a CPU session needs no CUDA libraries
    for _ in range(2):  # this wheel has no CUDA provider: ORT runs it on CPU, which --fallback cpu accepts
        make_session(graph, [("CUDAExecutionProvider", {}), "CPUExecutionProvider"], fallback=True)
    assert events == ["session", "preload", "session", "session"]
    assert capsys.readouterr().out == ""


def test_a_provider_that_fails_to_start_names_the_missing_library_and_the_fix(monkeypatch):
    def one_line(*args):
        message = providers.start_failure("cuda", "target.onnx", *args)
        assert "\n" not in message and message.endswith("pass --fallback cpu to run on CPU")
        return message

    old_driver = one_line("1.31.1", 13, 550, "libcudart.so.13: cannot open shared object file")
    assert "CUDA 13 build, which needs NVIDIA driver 580 or newer, and this machine has 550" in old_driver
    assert "'onnxruntime-gpu[cuda,cudnn]<1.27'" in old_driver
    assert "<1.27" not in one_line("1.26.0", 12, 510, None) and "driver 525" in one_line("1.26.0", 12, 510, None)
    cudnn = one_line("1.26.0", 12, 550, "libcudnn.so.9: cannot open shared object file: No such file or directory")
    assert "libcudnn.so.9 not found; pip install 'onnxruntime-gpu[cuda,cudnn]==1.26.0' puts CUDA 12" in cudnn
    assert "install TensorRT" in one_line("1.31.1", 13, 590, "libnvinfer.so.10: cannot open shared object file")
    assert "no NVIDIA driver" in one_line("1.31.1", 13, None, "libcuda.so.1: cannot open shared object file")
    assert "cuDNN 9 libraries" in one_line("1.31.1", None, None, None)  # nothing known: the usual suspects
    # check_started gathers the facts from the machine: here, those of a CUDA 13 wheel without cuBLAS.
    monkeypatch.setattr(providers, "cuda_build", lambda: 13)
    monkeypatch.setattr(providers, "driver_version", lambda: 590)
    monkeypatch.setattr(providers, "_provider_load_error",
                        lambda name: "libcublasLt.so.13: cannot open shared object file: No such file or directory")

    class QuietFallback:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(UserError, match=r"cuda failed to start for target.onnx.*libcublasLt.so.13 not found.*"
                                        r"onnxruntime-gpu\[cuda,cudnn\]==" + providers.ort.__version__):
        check_started(QuietFallback(), PROVIDERS["cuda"], fallback=False, graph="target.onnx")
    check_started(QuietFallback(), PROVIDERS["cuda"], fallback=True, graph="target.onnx")


def test_the_driver_version_is_read_from_the_kernel_module_line():
    proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs)\n"
    assert providers.driver_version(proprietary) == 550
    assert providers.driver_version(open_module) == 580
    assert providers.driver_version("GCC version: gcc 12.2.0\n") is None


def test_the_placement_warning_names_compute_nodes_off_the_gpu():
    cuda, cpu, trt = PROVIDERS["cuda"], PROVIDERS["cpu"], PROVIDERS["tensorrt"]
    report = {cuda: [("MatMul", "q_proj"), ("Softmax", "attn")],
              cpu: [("Shape", "shape_0"), ("Range", "slots"), ("MatMulInteger", "lm_head"),
                    ("MatMulInteger", "layers.0.mlp.up")]}
    warning = providers.placement_warning(report, cuda, "target.onnx")
    assert warning.startswith("warning: target.onnx: 2 compute nodes are not on cuda (2 MatMulInteger on cpu")
    assert "lm_head" in warning and "shape_0" not in warning and "q_proj" not in warning
    # Shape arithmetic on the CPU is ORT's choice, not a fallback.
    assert providers.placement_warning({cuda: [("MatMul", "a")], cpu: [("Shape", "s")]}, cuda, "g") is None
    # TensorRT that left a matmul to the CUDA provider: check_started cannot see it, this does.
    partial = {trt: [("MatMul", "a"), ("Softmax", "b")], cuda: [("MatMul", "c")]}
    assert "1 MatMul on cuda" in providers.placement_warning(partial, trt, "target.onnx")


def test_placement_is_read_from_a_real_session(tmp_path, records):
    """ORT's own report (session.record_ep_graph_assignment_info) on the CPU, read as if CUDA was asked for."""
    graph = str(_tiny_graph(tmp_path / "tiny.onnx"))
    ort = providers.ort
    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    assert providers.placement(session) == {"CPUExecutionProvider": [("MatMul", "proj"), ("Relu", "act")]}
    providers.warn_placement(session, PROVIDERS["cuda"], "tiny.onnx")
    assert records == [(logging.WARNING, "warning: tiny.onnx: 1 compute nodes are not on cuda (1 MatMul on cpu; "
                                         "proj); they run slower there, with copies between host and device "
                                         "for CPU nodes")]
    unrecorded = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    assert providers.placement(unrecorded) is None


def test_the_package_installs_one_runtime_build_by_extra():
    """Review F3: a base dependency on either wheel lets pip put one build over the other."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    assert [d for d in extras["cpu"] if d.startswith("onnxruntime")] == ["onnxruntime>=1.24.3"]
    assert [d for d in extras["gpu"] if d.startswith("onnxruntime")] == ["onnxruntime-gpu[cuda,cudnn]>=1.24.3"]
    others = [d for name, deps in extras.items() if name not in ("cpu", "gpu") for d in deps]
    assert not [d for d in others if d.lower().startswith("onnxruntime")]
    assert '".[cpu,' in (ROOT / "Makefile").read_text()  # make test installs the CPU build


def test_the_cli_without_any_onnxruntime_is_one_line_and_status_2(tmp_path):
    """The runtime package imports onnxruntime on first use, so the CLI's error handler sees the failure."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from dflash_edge.runtime.cli import entry\n"
            f"sys.argv = ['dflash-generate', '--model', {str(tmp_path)!r}, 'hi']\n"
            "entry()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: import onnxruntime failed")
    assert "dflash-edge[cpu]" in lines[0] and "Traceback" not in proc.stderr


def test_cpu_quantizations_are_refused_or_flagged_on_a_gpu(records):
    """int8-tokens cannot run on CUDA (uint8 x uint8 MatMulInteger): one line; the ort variant's MatMulNBits
    runs but slowly for verifies: a warning; the standard-op int4 and the CPU provider: nothing."""
    from dflash_edge.errors import UserError

    gpu = [providers.PROVIDERS["cuda"], providers.PROVIDERS["cpu"]]

    def folder(kind, variant="ort"):
        return {"target": {"quantization": kind}, "variant": variant}

    with pytest.raises(UserError, match="int8-tokens.*--device nvidia-gpu.*--provider cpu"):
        providers.check_quantization(folder("int8-tokens"), gpu)
    providers.check_quantization(folder("int8-tokens"), [providers.PROVIDERS["cpu"]])
    assert records == []
    providers.check_quantization(folder("int4", "tensorrt"), gpu)
    providers.check_quantization(folder(None), gpu)
    assert records == []
    providers.check_quantization(folder("int4"), gpu)
    assert len(records) == 1 and records[0][0] == logging.WARNING
    assert "MatMulNBits" in records[0][1] and "nvidia-gpu" in records[0][1]


def test_the_nvidia_gpu_preset_picks_fp16_standard_ops_and_int4_for_large_targets():
    from dflash_edge.export.devices import apply_preset

    assert apply_preset("nvidia-gpu", None, None, None, target_params=8_000_000_000)[:3] == ("fp16", "tensorrt", "int4")
    assert apply_preset("nvidia-gpu", None, None, None, target_params=1_000_000_000)[:3] == ("fp16", "tensorrt", None)


def test_tensorrt_engines_are_built_for_a_bounded_context(tiny_llama, monkeypatch, tmp_path):
    """Llama-3.1's 131,072 positions would size TensorRT's scratch for all of them (review F5): its profiles,
    and the context a generation may use under it, stop at TRT_MAX_CONTEXT unless DFLASH_MAX_CONTEXT says
    otherwise; the other providers keep the model's context. The norms stay fp32 under fp16 (F4)."""
    import json

    from dflash_edge.errors import UserError
    from dflash_edge.runtime.cache import KVCache

    _, _, out = tiny_llama
    manifest = json.loads((out / "dflash_edge.json").read_text())
    manifest["target"]["max_context"] = 131072
    monkeypatch.delenv("DFLASH_MAX_CONTEXT", raising=False)
    trt, cpu = providers.PROVIDERS["tensorrt"], providers.PROVIDERS["cpu"]
    assert providers.context_limit(manifest, trt) == providers.TRT_MAX_CONTEXT == 8192
    assert providers.context_limit(manifest, cpu) == 131072
    high = _parse(tensorrt_profiles(manifest, "target.onnx")["trt_profile_max_shapes"])
    assert 8192 <= high["past_key_values.0.key"][2] <= 8192 + 16 + KVCache.CHUNK
    monkeypatch.setenv("DFLASH_MAX_CONTEXT", "2048")
    assert providers.context_limit(manifest, trt) == providers.context_limit(manifest, cpu) == 2048
    assert _parse(tensorrt_profiles(manifest, "target.onnx")["trt_profile_max_shapes"])[
        "past_key_values.0.key"][2] <= 2048 + 16 + KVCache.CHUNK
    monkeypatch.setenv("DFLASH_MAX_CONTEXT", "lots")
    with pytest.raises(UserError, match="DFLASH_MAX_CONTEXT"):
        providers.context_limit(manifest, cpu)
    monkeypatch.delenv("DFLASH_MAX_CONTEXT")
    monkeypatch.setenv("DFLASH_EDGE_CACHE", str(tmp_path))
    options = provider_options([trt, cpu], out, manifest, "target.onnx")[0][1]
    assert options["trt_layer_norm_fp32_fallback"] == "True"
