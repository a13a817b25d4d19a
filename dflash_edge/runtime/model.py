"""An exported folder, loaded: the target and drafter sessions and the caches they read and write."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import UserError
from ..manifest import inside, read_manifest
from .cache import KVCache
from .providers import PROVIDERS, TRT_PREFILL_CHUNK, provider_options, resolve_providers, verify_limit
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
        threads = threads or default_threads()
        m = self.manifest
        self.target_info = m["target"]
        self.shared = SharedWeights(self.folder, m.get("shared_weights"))
        self.drafter_info = m.get("drafter") if load_drafter else None
        tensorrt = self.providers[0] == PROVIDERS["tensorrt"]
        # TensorRT builds its engines for bounded shapes; a longer prompt is prefilled in pieces.
        self.prefill_chunk = TRT_PREFILL_CHUNK if tensorrt else None

        def session(graph: str, **kwargs):
            providers = provider_options(self.providers, self.folder, m, graph)
            inside(self.folder, graph)  # checked again here: read_manifest's check is not this code's
            return make_session(self.folder / graph, providers, self.shared, threads, fallback=fallback, **kwargs)

        self.kv_dtype = kv_dtype(self.target_info["dtype"], self.providers[0])
        self.target = session(self.target_info["graph"])
        names = self.target_info["inputs"]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = [n for n in self.target_info["outputs"] if n.startswith("present.")]
        # Where the caches and the taps live: device memory under CUDA and TensorRT, else host memory.
        self.device = "cuda" if self.providers[0] in (PROVIDERS["cuda"], PROVIDERS["tensorrt"]) else "cpu"
        self.on_host = self.device == "cpu"  # tests set it False to run the device path's logic on the CPU
        self.tokenizer = Tokenizer(inside(self.folder, m["tokenizer"]))
        self.stop_token_ids = set(m["stop_token_ids"])
        self.max_context = int(self.target_info["max_context"])
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
        """An empty target cache with room for `positions` (on a device: all a generation will need)."""
        t = self.target_info
        cache = KVCache(t["num_layers"], t["num_kv_heads"], t["head_dim"], self.kv_dtype, self.device)
        cache.reserve(positions)  # never zero slots: TensorRT's shape profiles start at one chunk
        return cache

    def new_draft_cache(self, positions: int = 1) -> KVCache:
        d = self.drafter_info
        cache = KVCache(d["num_layers"], d["num_kv_heads"], d["head_dim"], self.kv_dtype, self.device)
        cache.reserve(positions)
        return cache

    def run_target(self, ids: list[int], cache: KVCache, last_only: bool, logits: bool = False,
                   taps: bool = False) -> TargetStep:
        """Run ids at the positions after the cache's committed ones; the graph writes their K/V into the
        cache, and cache.commit(keep) then keeps the first `keep` of them. Only the ids (and the logits and
        taps when asked for) come back; the taps stay on the provider's device."""
        n, start = len(ids), cache.length
        cache.reserve(n)
        binding = self.target.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None])
        binding.bind_cpu_input("logits_index", np.asarray([n - 1] if last_only else np.arange(n), dtype=np.int64))
        binding.bind_output("next_token_ids", "cpu")
        if logits:
            binding.bind_output("logits", "cpu")
        if taps:
            binding.bind_output("aux_hidden_states", self.device)
        cache.bind(binding, self.past_names, self.present_names)
        self.target.run_with_iobinding(binding)
        outs = iter(binding.get_outputs())  # in the order they were bound
        next_ids = next(outs).numpy()[0]
        return TargetStep(next_ids, next(outs).numpy()[0] if logits else None, next(outs) if taps else None)

    def prefill(self, ids: list[int], cache: KVCache, logits: bool = False,
                taps: bool = False) -> tuple[TargetStep, list[tuple[ort.OrtValue, int]]]:
        """Run and commit the prompt (in pieces where the provider bounds a call). Returns the last
        position's step and, with taps, every piece's (taps, length) for project_context."""
        step = self.prefill_chunk or len(ids)
        pieces = []
        for start in range(0, len(ids), step):
            piece = ids[start:start + step]
            out = self.run_target(piece, cache, last_only=True, logits=logits, taps=taps)
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
            binding = self.drafter_context.io_binding()
            binding.bind_ortvalue_input("target_hidden", taps)
            binding.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None])
            cache.bind(binding, self.context_past, self.context_present)
            self.drafter_context.run_with_iobinding(binding)
            cache.commit(keep)

    def draft(self, last_token: int, start: int, block: int, cache: KVCache) -> list[int]:
        """Draft block-1 tokens after last_token (at position start) in one drafter pass, reading the draft
        cache's slots before start."""
        ids = [last_token] + [int(self.drafter_info["mask_token_id"])] * (block - 1)
        binding = self.drafter_block.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start, start + block, dtype=np.int64)[None])
        for name, value in zip(self.context_past, cache.values):
            binding.bind_ortvalue_input(name, value)
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
