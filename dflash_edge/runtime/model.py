"""An exported folder, loaded: the target and drafter sessions and the caches they read and write."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..manifest import inside, read_manifest
from .cache import KVCache
from .providers import (PROVIDERS, TRT_PREFILL_CHUNK, check_quantization, context_limit, ort, provider_options,
                        resolve_providers, verify_limit)
from .session import SharedWeights, default_threads, make_session
from .tokenizer import Tokenizer


@dataclass
class TargetStep:
    """What a target call returns to the host: ids always, logits and taps when asked for."""
    next_ids: np.ndarray               # [k] the argmax of each computed row
    logits: np.ndarray | None = None   # [k, vocab] (sampling needs them; greedy decoding does not)
    taps: ort.OrtValue | None = None   # [1, n, F], left where the drafter's graphs read them (the device)


class ExportedModel:
    """Everything in an exported folder, ready to decode. Holds no per-generation state."""

    def __init__(self, folder: str | Path, provider: str = "cpu", fallback: bool = False,
                 threads: int | None = None, load_drafter: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.providers = resolve_providers(provider, fallback)
        check_quantization(self.manifest, self.providers)
        threads = threads or default_threads()
        m = self.manifest
        self.target_info = m["target"]
        self.shared = SharedWeights(self.folder, m.get("shared_weights"))
        self.drafter_info = m.get("drafter") if load_drafter else None
        # A longer prompt is prefilled in pieces on every provider (prefill_chunk says why).
        self.prefill_chunk = prefill_chunk(self.providers[0])

        def session(graph: str, **kwargs):
            providers = provider_options(self.providers, self.folder, m, graph)
            inside(self.folder, graph)  # checked again here: read_manifest's check is not this code's
            return make_session(self.folder / graph, providers, self.shared, threads, fallback=fallback, **kwargs)

        self.kv_dtype = kv_dtype(self.target_info["dtype"], self.providers[0])
        self.target = session(self.target_info["graph"])
        names = self.target_info["inputs"]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = [n for n in self.target_info["outputs"] if n.startswith("present.")]
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
        self._out_dtypes = {o.name: types.get(o.type, np.float32) for o in self.target.get_outputs()}
        taps_out = next((o for o in self.target.get_outputs() if o.name == "aux_hidden_states"), None)
        width = taps_out.shape[-1] if taps_out is not None else None
        self.tap_width = width if isinstance(width, int) else \
            len(self.target_info.get("tap_layer_ids", ())) * int(self.target_info["hidden_size"])
        # Where the caches and the taps live: device memory under CUDA and TensorRT, else host memory.
        self.device = "cuda" if self.providers[0] in (PROVIDERS["cuda"], PROVIDERS["tensorrt"]) else "cpu"
        self.on_host = self.device == "cpu"  # tests set it False to run the device path's logic on the CPU
        # Under TensorRT the caches are written to a second set of buffers, not in place (cache.KVCache);
        # tests set it on the CPU.
        self.double_buffer = self.providers[0] == PROVIDERS["tensorrt"]
        self.tokenizer = Tokenizer(inside(self.folder, m["tokenizer"]))
        self.stop_token_ids = set(m["stop_token_ids"])
        self.max_context = context_limit(m, self.providers[0])
        self.chat = m.get("chat")
        self.drafter_context = self.drafter_block = None
        self._measured_costs = None
        if self.drafter_info:
            d = self.drafter_info
            # Without prepacking, ONNX Runtime's CPU Gemm repacks a weight on every call: a round's draft
            # and projection took 8.9 ms instead of 6.8 (SmolLM2, 8,192-token head, 2 AVX2 cores). A
            # full-vocabulary head is the target's shared matrix, which prepacking would copy (113 MB here).
            vocab = self.target_info["vocab_size"]
            reduced_head = d.get("draft_vocab_size", vocab) < vocab
            self.drafter_context = session(d["context_graph"], spin=False)
            self.drafter_block = session(d["block_graph"], prepack=reduced_head, spin=False)
            self.context_past = d["io"]["context"]["inputs"][2:]
            self.context_present = d["io"]["context"]["outputs"]

    @property
    def has_drafter(self) -> bool:
        return self.drafter_block is not None

    @property
    def block_size(self) -> int:
        return int(self.drafter_info["block_size"]) if self.drafter_info else 1

    @property
    def verify_limit(self) -> int:
        """The most tokens one verify holds (providers.verify_limit)."""
        return verify_limit(self.manifest)

    def new_target_cache(self, positions: int = 1) -> KVCache:
        """An empty target cache with room for `positions`; it grows as it fills (cache.KVCache)."""
        t = self.target_info
        cache = KVCache(t["num_layers"], t["num_kv_heads"], t["head_dim"], self.kv_dtype, self.device,
                        **self._growth())
        cache.reserve(positions)  # never zero slots: TensorRT's shape profiles start at one chunk
        return cache

    def new_draft_cache(self, positions: int = 1) -> KVCache:
        d = self.drafter_info
        cache = KVCache(d["num_layers"], d["num_kv_heads"], d["head_dim"], self.kv_dtype, self.device,
                        **self._growth())
        cache.reserve(positions)
        return cache

    def _shrink_arena(self) -> ort.RunOptions:
        """Run options that make ORT free the arena's unused chunks after the run (host and device)."""
        options = ort.RunOptions()
        arenas = "cpu:0" + (";gpu:0" if self.device == "cuda" else "")
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        return options

    def _growth(self) -> dict:
        """Caches grow by CHUNK on the host, by DEVICE_CHUNK on a device, never past the context a
        generation may use plus a verify (the largest shape TensorRT's profiles take)."""
        limit = -(-(self.max_context + self.verify_limit) // KVCache.CHUNK) * KVCache.CHUNK
        return {"step": KVCache.CHUNK if self.on_host else KVCache.DEVICE_CHUNK, "max_slots": limit,
                "double": self.double_buffer}

    def run_target(self, ids: list[int], cache: KVCache, last_only: bool, logits: bool = False,
                   taps: bool = False, shrink: bool = False) -> TargetStep:
        """Run ids at the positions after the cache's committed ones; the graph writes their K/V into the
        cache, and cache.commit(keep) then keeps the first `keep` of them. Only the ids (and the logits and
        taps when asked for) come back; the taps stay on the provider's device."""
        n, start = len(ids), cache.length
        cache.reserve(n)
        k = 1 if last_only else n
        wanted = ("next_token_ids",) + (("logits",) if logits else ()) + (("aux_hidden_states",) if taps else ())
        # The cache's own binding for this session: its buffers stay bound; only the small tensors change.
        binding = cache.binding(self.target, self.past_names, self.present_names, tuple((w, "cpu") for w in wanted))
        binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None])
        binding.bind_cpu_input("logits_index", np.asarray([n - 1] if last_only else np.arange(n), dtype=np.int64))
        # Fresh output buffers of the exact shapes, bound every call (cache.binding says why); reading them
        # directly spares get_outputs(), which wraps all 2L cache buffers too (27 us for 6 layers).
        next_ids = np.empty((1, k), dtype=np.int64)
        binding.bind_ortvalue_output("next_token_ids", ort.OrtValue.ortvalue_from_numpy(next_ids))
        scores = tapped = None
        if logits:
            scores = np.empty((1, k, self.target_info["vocab_size"]), dtype=self._out_dtypes["logits"])
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(scores))
        if taps:
            tapped = ort.OrtValue.ortvalue_from_shape_and_type(
                (1, n, self.tap_width), self._out_dtypes["aux_hidden_states"], self.device, 0)
            binding.bind_ortvalue_output("aux_hidden_states", tapped)
        self.target.run_with_iobinding(binding, self._shrink_arena() if shrink else None)
        cache.written()
        return TargetStep(next_ids[0], None if scores is None else scores[0], tapped)

    def prefill(self, ids: list[int], cache: KVCache, logits: bool = False,
                taps: bool = False) -> tuple[TargetStep, list[tuple[ort.OrtValue, int]]]:
        """Run and commit the prompt (in pieces where the provider bounds a call). Returns the last
        position's step and, with taps, every piece's (taps, length) for project_context."""
        step = self.prefill_chunk or len(ids)
        pieces = []
        for start in range(0, len(ids), step):
            piece = ids[start:start + step]
            last = start + step >= len(ids)
            out = self.run_target(piece, cache, last_only=True, logits=logits, taps=taps,
                                  shrink=last and len(ids) > SHRINK_AFTER)
            cache.commit(len(piece))
            if taps:
                pieces.append((out.taps, len(piece)))
        return out, pieces

    def project_context(self, pending: list[tuple[ort.OrtValue, int]], cache: KVCache) -> None:
        """Project committed positions into the draft cache, in order: each (taps [1, n, F], keep) writes
        the context K/V of n tapped positions after the committed ones and commits the first `keep`.

        The rows past `keep` (rejected drafts) are written too, where the next entry overwrites them and
        no draft reads them first: so taps never need cutting on the device. On the host the kept rows
        are joined into one call instead.
        """
        if self.on_host and len(pending) > 1:
            rows = np.concatenate([taps.numpy()[0, :keep] for taps, keep in pending])
            pending = [(ort.OrtValue.ortvalue_from_numpy(rows[None]), len(rows))]
        for taps, keep in pending:
            n, start = taps.shape()[1], cache.length
            cache.reserve(n)
            binding = cache.binding(self.drafter_context, self.context_past, self.context_present)
            binding.bind_ortvalue_input("target_hidden", taps)
            binding.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None])
            self.drafter_context.run_with_iobinding(binding)
            cache.written()
            cache.commit(keep)

    def draft(self, last_token: int, start: int, block: int, cache: KVCache) -> list[int]:
        """Draft block-1 tokens after last_token (at position start) in one drafter pass, reading the draft
        cache's slots before start."""
        ids = [last_token] + [int(self.drafter_info["mask_token_id"])] * (block - 1)
        binding = cache.binding(self.drafter_block, self.context_past, None, (("draft_ids", "cpu"),))
        binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start, start + block, dtype=np.int64)[None])
        binding.bind_output("draft_ids", "cpu")
        self.drafter_block.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0].tolist()

    def round_costs(self):
        """Cost of a drafter's round per block size in plain decode steps; measured on first use, then kept."""
        return self._costs()[1]

    def verify_costs(self):
        """Cost of verifying b tokens (a prompt-lookup round: no drafter pass), in plain decode steps."""
        return self._costs()[0]

    def _costs(self):
        if self._measured_costs is None:
            from .policy import measure_costs
            self._measured_costs = measure_costs(self)
        return self._measured_costs

    def check_block_size(self, block_size: int | None) -> int:
        if not self.has_drafter:
            if block_size not in (None, 1):
                raise UserError(f"{self.folder} has no drafter; --block-size needs an export made with --drafter")
            return 1
        trained = self.block_size
        if block_size is None:
            return trained
        if not 1 <= block_size <= trained:
            raise UserError(f"--block-size {block_size} is outside 1..{trained} (the drafter's trained block size)")
        return block_size


PREFILL_CHUNK = 512  # longest prompt piece one call takes on the CPU and CUDA providers
# A prompt longer than this leaves ONNX Runtime's arena holding its pieces' scratch (attention scores over the
# whole cache), which a decode step never needs again: the last piece's run hands it back (SmolLM2, 8,000
# tokens: BENCHMARKS.md section 12).
SHRINK_AFTER = 256


def prefill_chunk(provider: str) -> int:
    """The longest prompt piece one target call takes (review F9). TensorRT's engines are built for
    TRT_PREFILL_CHUNK at most. Elsewhere a call's attention scores are [heads, piece, cache slots] fp32
    per layer: a whole 8,192-token prompt on Llama-3.1-8B needs 8.6 GB for them alone (a 24 GB card runs
    out), in pieces of 512 a sixteenth. A piece of 512 rows still fills the matrix units, and on the host
    the cache grows piece by piece, so early pieces read fewer slots; prompts up to 512 tokens run in one
    call as before. Pieces give the same tokens (tests/test_device_runtime.py)."""
    return TRT_PREFILL_CHUNK if provider == PROVIDERS["tensorrt"] else PREFILL_CHUNK


def kv_dtype(dtype: str, provider: str):
    """The cache buffers' numpy dtype for a graph of `dtype` ("fp32", "fp16" or "bf16") on `provider`."""
    if dtype != "bf16":
        return np.float16 if dtype == "fp16" else np.float32
    if provider == PROVIDERS["cpu"]:
        raise UserError("this folder's graphs are bf16, which ONNX Runtime's CPU provider cannot run; export "
                        "for the CPU with --dtype fp32 or --quantize int4")
    # numpy has no bfloat16, and the runtime depends on numpy, onnxruntime and tokenizers only.
    raise UserError("this runtime does not yet allocate bf16 caches; export with --dtype fp16 for CUDA and "
                    "TensorRT meanwhile")
