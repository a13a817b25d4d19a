"""Execution providers by name, and the options each graph needs on them.

cpu, cuda and tensorrt map to ONNX Runtime's providers; CPU is always registered last so the nodes a GPU
provider leaves (shape arithmetic, mostly) still run. TensorRT builds one engine per graph and needs,
for every input with a dynamic axis, the smallest, typical and largest shape it will see: the profiles
below follow what the runtime feeds (prefill chunks, verify blocks, single steps, the cache's slots).
"""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from ..errors import UserError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
MISSING = {  # what a provider that is compiled in but cannot start usually lacks
    "cuda": "the CUDA runtime or cuDNN 9 libraries (onnxruntime-gpu needs them on the library path; "
            "onnxruntime.preload_dlls() loads them from the nvidia-* pip packages)",
    "tensorrt": "the TensorRT libraries (libnvinfer) or CUDA/cuDNN",
}
TRT_PREFILL_CHUNK = 1024  # longest prompt piece one TensorRT call takes; longer prompts go in pieces
TRT_OPT_CONTEXT = 1024    # the cache length TensorRT tunes its kernels for
VERIFY_WITHOUT_DRAFTER = 16  # most tokens per verify in a folder without a drafter (prompt-lookup drafts)


def resolve_providers(name: str, fallback: bool = False) -> list[str]:
    """Provider list for ORT: the one asked for, then CPU. Unavailable -> a one-line error unless fallback."""
    if name not in PROVIDERS:
        raise UserError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[name]
    available = ort.get_available_providers()
    if wanted not in available:
        if not fallback:
            hint = " (install onnxruntime-gpu instead of onnxruntime)" if name != "cpu" else ""
            raise UserError(f"provider {name} is not available in this onnxruntime "
                            f"(has {', '.join(available)}){hint}; pass --fallback cpu to run on CPU")
        return [PROVIDERS["cpu"]]
    if name == "tensorrt":
        return [wanted, PROVIDERS["cuda"], PROVIDERS["cpu"]]
    return [wanted] if name == "cpu" else [wanted, PROVIDERS["cpu"]]


def check_started(session: ort.InferenceSession, wanted: str, fallback: bool, graph: str) -> None:
    """ORT quietly drops a GPU provider that fails to initialise and runs everything on CPU; say so."""
    if session.get_providers()[0] == wanted or fallback:
        return
    name = next(k for k, v in PROVIDERS.items() if v == wanted)
    raise UserError(f"provider {name} failed to start for {graph} (ONNX Runtime fell back to CPU): "
                    f"missing {MISSING.get(name, 'libraries')}; pass --fallback cpu to run on CPU")


def _shape(dims) -> str:
    return "x".join(str(d) for d in dims)


def _profiles(shapes: dict[str, tuple[tuple, tuple, tuple]]) -> dict[str, str]:
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    return {key: ",".join(f"{name}:{_shape(s[i])}" for name, s in shapes.items()) for i, key in enumerate(keys)}


def verify_limit(manifest: dict) -> int:
    """The most tokens one target call verifies: the exported drafter's block size, whether or not the
    drafter is loaded, else VERIFY_WITHOUT_DRAFTER (TensorRT's profiles are built for it)."""
    return int((manifest.get("drafter") or {}).get("block_size", VERIFY_WITHOUT_DRAFTER))


def tensorrt_profiles(manifest: dict, graph: str) -> dict[str, str]:
    """min/opt/max shapes of every dynamic input of one graph of the folder, as TensorRT EP options."""
    from .cache import KVCache

    t, d = manifest["target"], manifest.get("drafter") or {}
    block = verify_limit(manifest)
    chunk = KVCache.CHUNK
    slots = -(-(int(t["max_context"]) + block) // chunk) * chunk  # the largest cache buffer
    opt = min(TRT_OPT_CONTEXT, int(t["max_context"]))
    prefill = min(TRT_PREFILL_CHUNK, int(t["max_context"]))

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


def provider_options(providers: list[str], folder: Path, manifest: dict, graph: str) -> list:
    """ORT's providers argument for one graph: names, with TensorRT's options where it is first."""
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
        **tensorrt_profiles(manifest, graph),
    }
    return [(providers[0], options), *providers[1:]]
