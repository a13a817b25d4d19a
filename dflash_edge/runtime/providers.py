"""Execution providers by name, and the options each graph needs on them.

cpu, cuda and tensorrt map to ONNX Runtime's providers; CPU is always registered last so the nodes a GPU
provider leaves (shape arithmetic, mostly) still run. TensorRT builds one engine per graph and needs,
for every input with a dynamic axis, the smallest, typical and largest shape it will see: the profiles
below follow what the runtime feeds (prefill chunks, verify blocks, single steps, the cache's slots).

A GPU provider fails in ways ONNX Runtime does not explain: two runtime wheels overwriting each other,
CUDA/cuDNN that are installed but not loaded, a CUDA 13 build on an older driver, nodes that quietly run
on the CPU. Each of these is found here and said in one line (docs/gpu-findings.md, F2/F3/F15/F17).
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import sys
import threading
from collections import Counter
from importlib import metadata
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)


class MissingRuntime(UserError, ImportError):
    """onnxruntime cannot be imported. An ImportError too, so code probing for optional imports still works."""


def runtime_wheels(dists=None) -> list[str]:
    """Installed distributions that ship the `onnxruntime` package (onnxruntime, onnxruntime-gpu,
    onnxruntime-directml, ...). More than one means they wrote into one folder over each other."""
    found = set()
    for dist in metadata.distributions() if dists is None else dists:
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if not (name == "onnxruntime" or name.startswith(("onnxruntime-", "ort-"))):
            continue
        top = dist.read_text("top_level.txt")  # onnxruntime-genai and -extensions ship other packages
        if top is not None:
            ships = "onnxruntime" in top.split()
        else:
            ships = any(f.parts[0] == "onnxruntime" for f in dist.files or [])
        if ships:
            found.add(name)
    return sorted(found)


def clash(wheels: list[str]) -> str | None:
    """The one-line fix when several runtime wheels share the onnxruntime/ folder, else None."""
    if len(wheels) < 2:
        return None
    return (f"{' and '.join(wheels)} are installed together and overwrite each other's onnxruntime/ folder "
            f"(the CPU build can hide the GPU one); fix: pip uninstall -y {' '.join(wheels)} && "
            f"pip install 'onnxruntime-gpu[cuda,cudnn]'")


def import_failure(error: ImportError, wheels: list[str]) -> str:
    """One line for an `import onnxruntime` that failed: not installed, half-removed, or a missing library."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, ModuleNotFoundError) and error.name == "onnxruntime" and not wheels:
        return ("onnxruntime is not installed: pip install 'dflash-edge[cpu]' (CPU) or 'dflash-edge[gpu]' "
                "(NVIDIA GPU); on Jetson install the board's onnxruntime-gpu (samples/jetson/README.md)")
    lib = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", first)
    # A CUDA library (onnxruntime-gpu 1.27.0 needs libcudart.so.13 just to import, microsoft/onnxruntime#29500);
    # one of onnxruntime's own is a broken install, below.
    if lib and "onnxruntime" not in lib.group(1):
        return (f"import onnxruntime failed: {lib.group(1)} not found; install the CUDA libraries it was built "
                f"for: pip install 'onnxruntime-gpu[cuda,cudnn]' (with an NVIDIA driver older than 580, "
                f"a CUDA 12 build: 'onnxruntime-gpu[cuda,cudnn]<1.27')")
    names = " ".join(wheels) or "onnxruntime onnxruntime-gpu"
    return (f"import onnxruntime failed ({first}); the install is broken (two runtime wheels removed one "
            f"another's files?); fix: pip uninstall -y {names} && pip install 'dflash-edge[cpu]' or "
            f"'dflash-edge[gpu]'")


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingRuntime(import_failure(e, runtime_wheels())) from None
    return onnxruntime


# Modules that take `ort` from here (session.py) turn a missing or broken install into one line; one that
# imports onnxruntime itself first gets Python's ImportError instead.
ort = _import_onnxruntime()

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU = (PROVIDERS["cuda"], PROVIDERS["tensorrt"])
MISSING = {  # what a provider that is compiled in but cannot start usually lacks
    "cuda": "the CUDA runtime or cuDNN 9 libraries (onnxruntime-gpu needs them on the library path; "
            "onnxruntime.preload_dlls() loads them from the nvidia-* pip packages)",
    "tensorrt": "the TensorRT libraries (libnvinfer) or CUDA/cuDNN",
}
MIN_DRIVER = {12: 525, 13: 580}  # CUDA major -> oldest Linux driver branch (NVIDIA's minor-version table)
TRT_PREFILL_CHUNK = 1024  # longest prompt piece one TensorRT call takes; longer prompts go in pieces
TRT_OPT_CONTEXT = 1024    # the cache length TensorRT tunes its kernels for
VERIFY_WITHOUT_DRAFTER = 16  # most tokens per verify in a folder without a drafter (prompt-lookup drafts)


def resolve_providers(name: str, fallback: bool = False) -> list[str]:
    """Provider list for ORT: the one asked for, then CPU. Unavailable -> a one-line error unless fallback."""
    if name not in PROVIDERS:
        raise UserError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[name]
    problem = clash(runtime_wheels()) if wanted in GPU else None
    if problem and not fallback:
        raise UserError(problem)
    if problem:
        log.warning("warning: %s", problem)
    available = ort.get_available_providers()
    if wanted not in available:
        if not fallback:
            hint = " (pip install 'dflash-edge[gpu]': onnxruntime-gpu, not onnxruntime)" if name != "cpu" else ""
            raise UserError(f"provider {name} is not available in this onnxruntime "
                            f"(has {', '.join(available)}){hint}; pass --fallback cpu to run on CPU")
        return [PROVIDERS["cpu"]]
    if name == "tensorrt":
        return [wanted, PROVIDERS["cuda"], PROVIDERS["cpu"]]
    return [wanted] if name == "cpu" else [wanted, PROVIDERS["cpu"]]


def check_quantization(manifest: dict, providers: list[str]) -> None:
    """Quantized folders made for the CPU, asked to run on a GPU (review F7). int8-tokens multiplies uint8 by
    uint8 (MatMulInteger), which the CUDA provider has no kernel for: every product would run on the CPU,
    with copies both ways, while the session reports CUDA. The ort variant's int4/int8 (MatMulNBits) runs,
    but with fp32 activations CUDA's fast kernel serves one row only: a verify or a prefill dequantizes every
    weight per call, so DFlash loses to plain decoding there; that is a warning."""
    if providers[0] not in GPU:
        return
    kind = manifest["target"].get("quantization")
    if kind == "int8-tokens":
        raise UserError("this folder is int8-tokens (uint8 x uint8 MatMulInteger), which ONNX Runtime's CUDA "
                        "provider cannot run on the GPU; for GPUs export with --device nvidia-gpu (fp16, or "
                        "int4 as DequantizeLinear for large targets), or run this folder with --provider cpu")
    if kind in ("int4", "int8") and manifest.get("variant", "ort") == "ort":
        log.warning("warning: this folder's %s weights are MatMulNBits over fp32 activations: on CUDA a verify "
                    "or a prefill dequantizes every weight per call, so DFlash may not beat plain decoding; "
                    "for GPUs export with --device nvidia-gpu", kind)


_preload_lock = threading.Lock()
_preloaded = False


def preload_gpu_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip packages (onnxruntime.preload_dlls, ORT 1.21+) once per process,
    before the first CUDA or TensorRT session: the provider library finds them only once they are loaded.
    Without pip CUDA (a toolkit install, Jetson) it loads nothing and the library path applies as before."""
    global _preloaded
    with _preload_lock:
        if _preloaded or not hasattr(ort, "preload_dlls"):
            _preloaded = True
            return
        _preloaded = True
        said = io.StringIO()  # it prints to stdout, which is --json's; what it says goes to the debug log
        try:
            with contextlib.redirect_stdout(said):
                ort.preload_dlls()
        except Exception as e:  # a bad directory or a broken CUDA install: the session start says more
            said.write(f"preload_dlls: {e}")
        if said.getvalue().strip():
            log.debug("onnxruntime.preload_dlls: %s", said.getvalue().strip())


def cuda_build() -> int | None:
    """The CUDA major version this onnxruntime was built with (None for a CPU build or an unknown one)."""
    text = str(getattr(ort, "cuda_version", "") or "")
    major = text.split(".")[0]
    return int(major) if major.isdigit() else None


def driver_version(text: str | None = None) -> int | None:
    """The NVIDIA driver branch (550, 580, ...) from /proc/driver/nvidia/version; None where there is none."""
    if text is None:
        try:
            text = Path("/proc/driver/nvidia/version").read_text()
        except OSError:
            return None
    found = re.search(r"Kernel Module\b.*?\s(\d{3,})\.\d+", text)
    return int(found.group(1)) if found else None


def _provider_load_error(name: str) -> str | None:
    """Why the provider's own library does not load (the dynamic loader names the missing dependency)."""
    lib = {"linux": f"libonnxruntime_providers_{name}.so", "win32": f"onnxruntime_providers_{name}.dll"}
    path = Path(ort.__file__).parent / "capi" / lib.get(sys.platform, "")
    if not path.is_file():
        return None
    try:
        ctypes.CDLL(str(path))
    except OSError as e:
        return str(e).splitlines()[0] if str(e) else "cannot be loaded"
    return None


def start_failure(name: str, graph: str, version: str, build: int | None, driver: int | None,
                  load_error: str | None) -> str:
    """One line: why provider `name` did not start for `graph`, from what the machine says, and the fix.
    version/build: the onnxruntime-gpu release and its CUDA major; load_error: what the dynamic loader said
    about the provider's library."""
    head = f"provider {name} failed to start for {graph} (ONNX Runtime fell back to CPU)"
    tail = "; or pass --fallback cpu to run on CPU"
    need = MIN_DRIVER.get(build or 0)
    if need and driver and driver < need:
        older = " or install a CUDA 12 build: pip install 'onnxruntime-gpu[cuda,cudnn]<1.27'" if build > 12 else ""
        return (f"{head}: onnxruntime-gpu {version} is a CUDA {build} build, which needs NVIDIA driver {need} or "
                f"newer, and this machine has {driver}; update the driver{older}{tail}")
    lib = re.search(r"(lib[\w.+-]+\.so[\w.]*|\w+\.dll)", load_error or "")
    missing = lib.group(1) if lib and "providers" not in lib.group(1) else None
    if missing and "nvinfer" in missing:
        return (f"{head}: {missing} not found; install TensorRT and put its libraries on the library path "
                f"(LD_LIBRARY_PATH), or use --provider cuda{tail}")
    if missing and missing.startswith("libcuda."):
        return f"{head}: {missing} not found, so no NVIDIA driver is loaded; install the driver{tail}"
    if missing:  # pinned: an unpinned reinstall could swap a CUDA 12 build for a CUDA 13 one
        cuda = f"CUDA {build}" if build else "CUDA"
        return (f"{head}: {missing} not found; pip install 'onnxruntime-gpu[cuda,cudnn]=={version}' puts {cuda} "
                f"and cuDNN 9 where onnxruntime looks (or put them on LD_LIBRARY_PATH){tail}")
    return f"{head}: missing {MISSING.get(name, 'libraries')}{tail}"


def check_started(session: ort.InferenceSession, wanted: str, fallback: bool, graph: str) -> None:
    """ORT quietly drops a GPU provider that fails to initialise and runs everything on CPU; say so."""
    if session.get_providers()[0] == wanted or fallback:
        return
    name = next(k for k, v in PROVIDERS.items() if v == wanted)
    load_error = _provider_load_error(name) if wanted in GPU else None
    raise UserError(start_failure(name, graph, ort.__version__, cuda_build(), driver_version(), load_error))


# Op types that carry a graph's arithmetic. ORT keeps shape arithmetic (Shape, Gather, Range, Concat on int64)
# on the CPU on purpose; these never compute shapes, so one of them off the GPU is a real fallback (F7, F17).
COMPUTE_OPS = frozenset({
    "MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearMatMul", "DequantizeLinear", "DynamicQuantizeLinear", "Softmax",
    "ScatterElements", "ScatterND", "Attention", "MultiHeadAttention", "GroupQueryAttention",
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding", "Einsum", "Conv", "ArgMax", "TopK",
})


def placement(session) -> dict[str, list[tuple[str, str]]] | None:
    """Provider -> [(op type, node name)] as ORT assigned the nodes (the session must be created with
    session.record_ep_graph_assignment_info=1, ORT 1.24+); None where this ORT cannot say."""
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return None
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # not recorded (an older ORT ignores the config entry)
        return None
    report: dict[str, list[tuple[str, str]]] = {}
    for subgraph in subgraphs:
        report.setdefault(subgraph.ep_name, []).extend((n.op_type, n.name) for n in subgraph.get_nodes())
    return report


def placement_warning(report: dict[str, list[tuple[str, str]]], wanted: str, graph: str) -> str | None:
    """One line naming the compute nodes placed off the provider asked for, else None."""
    short = {v: k for k, v in PROVIDERS.items()}
    off = [(ep, op, node) for ep, nodes in report.items() if ep != wanted for op, node in nodes
           if op in COMPUTE_OPS]
    if not off:
        return None
    counts = Counter((op, short.get(ep, ep)) for ep, op, _ in off)
    kinds = ", ".join(f"{n} {op} on {ep}" for (op, ep), n in counts.most_common())
    names = ", ".join(node or "?" for _, _, node in off[:4]) + (", ..." if len(off) > 4 else "")
    return (f"warning: {graph}: {len(off)} compute nodes are not on {short.get(wanted, wanted)} ({kinds}; "
            f"{names}); they run slower there, with copies between host and device for CPU nodes")


def warn_placement(session, wanted: str, graph: str) -> None:
    """Log the placement warning for a session that started on a GPU provider (F17: check_started sees
    only the first provider, not the nodes TensorRT or CUDA left to the next one)."""
    report = placement(session)
    if report is None:
        log.debug("%s: this onnxruntime does not report node placement", graph)
        return
    message = placement_warning(report, wanted, graph)
    if message:
        log.warning(message)


def _shape(dims) -> str:
    return "x".join(str(d) for d in dims)


def _profiles(shapes: dict[str, tuple[tuple, tuple, tuple]]) -> dict[str, str]:
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    return {key: ",".join(f"{name}:{_shape(s[i])}" for name, s in shapes.items()) for i, key in enumerate(keys)}


def verify_limit(manifest: dict) -> int:
    """The most tokens one target call verifies: the exported drafter's block size, whether or not the
    drafter is loaded, else VERIFY_WITHOUT_DRAFTER (TensorRT's profiles are built for it)."""
    return int((manifest.get("drafter") or {}).get("block_size", VERIFY_WITHOUT_DRAFTER))


# TensorRT sizes its kernels and activation memory for the largest profile shape: at Llama-3.1's 131,072
# positions one fp32 attention-score tensor of a prefill piece is 17 GB (review F5). Its engines are built for
# this many positions unless DFLASH_MAX_CONTEXT says otherwise.
TRT_MAX_CONTEXT = 8192


def context_limit(manifest: dict, provider: str) -> int:
    """Positions a generation may use: the model's max_context, capped by DFLASH_MAX_CONTEXT on every
    provider and by TRT_MAX_CONTEXT under TensorRT when the variable is unset."""
    model = int(manifest["target"]["max_context"])
    text = os.environ.get("DFLASH_MAX_CONTEXT", "").strip()
    if text:
        if not text.isdigit() or int(text) < 64:
            raise UserError(f"DFLASH_MAX_CONTEXT={text!r}: give a number of positions, at least 64")
        return min(model, int(text))
    return min(model, TRT_MAX_CONTEXT) if provider == PROVIDERS["tensorrt"] else model


def tensorrt_profiles(manifest: dict, graph: str) -> dict[str, str]:
    """min/opt/max shapes of every dynamic input of one graph of the folder, as TensorRT EP options."""
    from .cache import KVCache

    t, d = manifest["target"], manifest.get("drafter") or {}
    block = verify_limit(manifest)
    chunk = KVCache.CHUNK
    context = context_limit(manifest, PROVIDERS["tensorrt"])
    slots = -(-(context + block) // chunk) * chunk  # the largest cache buffer
    opt = min(TRT_OPT_CONTEXT, context)
    prefill = min(TRT_PREFILL_CHUNK, context)

    def cache(names, kv, hd):
        shapes = {}
        for i, name in enumerate(names):
            lo, mid, hi = ((1, kv, n, hd) if i % 2 == 0 else (1, kv, hd, n) for n in (chunk, opt, slots))
            shapes[name] = (lo, mid, hi)
        return shapes

    if graph == t["graph"]:
        past = [n for n in t["inputs"] if n.startswith("past_key_values.")]
        return _profiles({
            "input_ids": ((1, 1), (1, block), (1, prefill)),
            "position_ids": ((1, 1), (1, block), (1, prefill)),
            "logits_index": ((1,), (block,), (block,)),
            **cache(past, t["num_kv_heads"], t["head_dim"]),
        })
    if graph in (d.get("context_graph"), d.get("block_graph")):
        io = d["io"]["context" if graph == d["context_graph"] else "block"]
        width = len(d["target_layer_ids"]) * t["hidden_size"]
        if graph == d["context_graph"]:
            shapes = {"target_hidden": ((1, 1, width), (1, block, width), (1, prefill, width)),
                      "position_ids": ((1, 1), (1, block), (1, prefill))}
        else:
            shapes = {n: ((1, 2), (1, block), (1, block)) for n in io["inputs"][:2]}
        return _profiles({**shapes, **cache(io["inputs"][2:], d["num_kv_heads"], d["head_dim"])})
    raise ValueError(f"{graph} is not a graph of this folder")


def engine_cache_dir(folder: Path, manifest: dict) -> Path:
    """Where TensorRT keeps built engines: per export (its creation time and a hash of its manifest tell
    re-exports apart), in DFLASH_EDGE_CACHE or ~/.cache/dflash-edge, since the export folder may be
    read-only. The manifest is untrusted: only digits, T, Z and - of its date reach the path."""
    import hashlib
    import json

    root = Path(os.environ.get("DFLASH_EDGE_CACHE", Path.home() / ".cache" / "dflash-edge"))
    created = str(manifest.get("export", {}).get("created", "unknown"))
    stamp = "".join(c for c in created if c.isascii() and (c.isdigit() or c in "TZ-"))[:32] or "unknown"
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return root / "tensorrt" / f"{folder.resolve().name}-{stamp}-{digest}"


def gpu_mem_limit(text: str | None = None) -> int | None:
    """DFLASH_GPU_MEM_LIMIT (bytes, or with a K/M/G/T suffix: "6G") as a byte count; None when unset."""
    text = os.environ.get("DFLASH_GPU_MEM_LIMIT") if text is None else text
    if not text or not text.strip():
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not found or float(found.group(1)) <= 0:
        raise UserError(f"DFLASH_GPU_MEM_LIMIT={text!r} is not a size; give bytes or e.g. 6G")
    scale = 1024 ** " KMGT".index(found.group(2).upper() or " ")
    return int(float(found.group(1)) * scale)


def cuda_options(manifest: dict, tf32: bool | None = None, mem_limit: int | None = None) -> dict[str, str]:
    """The CUDA provider's options for one folder (review F12, F18).

    TF32: ORT runs fp32 MatMul/Gemm in TF32 (10-bit mantissas) by default on Ampere and newer; an fp32
    folder's tokens would then drift from the CPU's, so it is off for fp32 graphs unless tf32=True or
    DFLASH_TF32=1 asks for the speed. Memory: the arena grows by what is asked for, not the next power of
    two (which can claim nearly twice a large model's need), and DFLASH_GPU_MEM_LIMIT (or mem_limit) caps
    it: on a Jetson the GPU shares the board's memory with everything else."""
    if tf32 is None:
        tf32 = os.environ.get("DFLASH_TF32", "") not in ("", "0")
    fp32 = manifest["target"]["dtype"] == "fp32"
    options = {"arena_extend_strategy": "kSameAsRequested", "use_tf32": "1" if tf32 or not fp32 else "0"}
    limit = mem_limit if mem_limit is not None else gpu_mem_limit()
    if limit:
        options["gpu_mem_limit"] = str(limit)
    return options


def provider_options(providers: list[str], folder: Path, manifest: dict, graph: str) -> list:
    """ORT's providers argument for one graph: names, with CUDA's options (cuda_options) or TensorRT's
    where either is first."""
    if providers[0] == PROVIDERS["cuda"]:
        return [(providers[0], cuda_options(manifest)), *providers[1:]]
    if providers[0] != PROVIDERS["tensorrt"]:
        return providers
    t = manifest["target"]
    cache = engine_cache_dir(folder, manifest)
    cache.mkdir(parents=True, exist_ok=True)
    options = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        # fp32 graphs stay fp32 unless their weights are int4, which TensorRT pairs with fp16 math.
        "trt_fp16_enable": str(t["dtype"] == "fp16" or t.get("quantization") == "int4"),
        # Under the fp16 flag TensorRT may run the norms' square-and-mean in fp16 despite the graph's casts;
        # the residual stream reaches |x| ~ 25,000 on real checkpoints, and x^2 overflows fp16 (review F4).
        "trt_layer_norm_fp32_fallback": "True",
        **tensorrt_profiles(manifest, graph),
    }
    return [(providers[0], options), *providers[1:]]
