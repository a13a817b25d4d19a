"""An exported folder, loaded: the target and drafter sessions and the caches they read and write."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..manifest import read_manifest
from .providers import PROVIDERS, TRT_PREFILL_CHUNK, provider_options, resolve_providers
from .session import SharedWeights, default_threads, make_session
from .tokenizer import Tokenizer


class TargetCache:
    """The target's KV cache: per layer a key buffer [1, kv, capacity, d] and a value buffer stored
    transposed, [1, kv, d, capacity], both read in place by the graph (see export.modeling.attend_cached).

    The graph returns K/V for the new positions only, in the same layouts; commit() writes the kept ones
    after the filled slots, so a decode step copies a few rows instead of the whole cache, and rollback is
    a length. The capacity grows in CHUNK-slot steps (the attention reads at most CHUNK - 1 empty slots,
    which the attention mask hides).
    """

    CHUNK = 128

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype):
        self.dtype = dtype
        key, value = (1, num_kv_heads, 0, head_dim), (1, num_kv_heads, head_dim, 0)
        self.buffers = [np.zeros(shape, dtype=dtype) for _ in range(num_layers) for shape in (key, value)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    @staticmethod
    def _slots(i: int, start: int, end: int) -> tuple:
        """Index of cache slots start..end in buffer i (keys hold slots on axis 2, values on axis 3)."""
        return (slice(None),) * (2 + i % 2) + (slice(start, end),)

    def reserve(self, n: int) -> None:
        """Make room for n positions after the filled ones."""
        need = self.length + n
        if need <= self.capacity:
            return
        capacity = -(-need // self.CHUNK) * self.CHUNK
        grown = []
        for i, old in enumerate(self.buffers):
            shape = list(old.shape)
            shape[2 + i % 2] = capacity
            # Zeros, not np.empty: masked slots must hold finite values, or 0 * NaN poisons the attention.
            new = np.zeros(shape, dtype=self.dtype)
            filled = self._slots(i, 0, self.length)
            new[filled] = old[filled]
            grown.append(new)
        self.buffers = grown

    def feeds(self, names: list[str], n: int) -> dict:
        """Graph inputs for n new positions: the buffers and the mask of filled slots (+ the new ones)."""
        mask = np.zeros((1, self.capacity + n), dtype=np.int64)
        mask[0, :self.length] = 1
        mask[0, self.capacity:] = 1
        return {"attention_mask": mask, **dict(zip(names, self.buffers))}

    def commit(self, presents: list[np.ndarray], keep: int) -> None:
        """Keep the first `keep` new positions the graph returned (the rest were rejected drafts)."""
        self.reserve(keep)
        for i, (buf, new) in enumerate(zip(self.buffers, presents)):
            buf[self._slots(i, self.length, self.length + keep)] = new[self._slots(i, 0, keep)]
        self.length += keep

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer i's filled keys [1, kv, length, d] and values [1, kv, length, d] (views)."""
        keys, values = self.buffers[2 * i], self.buffers[2 * i + 1]
        return keys[:, :, :self.length], values[..., :self.length].swapaxes(2, 3)


class DraftCache:
    """Per drafter layer, the K/V of committed context tokens. Append-only: it never rolls back."""

    def __init__(self):
        self.arrays: list[np.ndarray] | None = None

    @property
    def length(self) -> int:
        return 0 if self.arrays is None else self.arrays[0].shape[2]

    def append(self, new: list[np.ndarray]) -> None:
        self.arrays = new if self.arrays is None else [np.concatenate([a, b], axis=2)
                                                        for a, b in zip(self.arrays, new)]


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
            return make_session(self.folder / graph, providers, self.shared, threads, fallback=fallback, **kwargs)

        self.target = session(self.target_info["graph"])
        self.target_inputs = self.target_info["inputs"]
        self.target_outputs = self.target_info["outputs"]
        self.past_names = [n for n in self.target_inputs if n.startswith("past_key_values.")]
        self.kv_dtype = np.float16 if self.target_info["dtype"] == "fp16" else np.float32
        self.tokenizer = Tokenizer(self.folder / m["tokenizer"])
        self.stop_token_ids = set(m["stop_token_ids"])
        self.max_context = int(self.target_info["max_context"])
        self.chat = m.get("chat")
        self.drafter_context = self.drafter_block = None
        self._round_costs = None
        if self.drafter_info:
            d = self.drafter_info
            # The drafter is small: prepacking its weights buys little and would copy the shared LM head.
            self.drafter_context = session(d["context_graph"], prepack=False, spin=False)
            self.drafter_block = session(d["block_graph"], prepack=False, spin=False)
            self.context_out = d["io"]["context"]["outputs"]
            self.block_in = d["io"]["block"]["inputs"]

    @property
    def has_drafter(self) -> bool:
        return self.drafter_block is not None

    @property
    def block_size(self) -> int:
        return int(self.drafter_info["block_size"]) if self.drafter_info else 1

    def new_target_cache(self) -> TargetCache:
        t = self.target_info
        cache = TargetCache(t["num_layers"], t["num_kv_heads"], t["head_dim"], self.kv_dtype)
        cache.reserve(1)  # never zero slots: TensorRT's shape profiles start at one chunk
        return cache

    def run_target(self, ids: list[int], cache: TargetCache, last_only: bool):
        """Run ids after the cache's filled positions. Returns (logits [k, V], taps [n, F], presents);
        cache.commit(presents, keep) then keeps the first `keep` of them."""
        n, start = len(ids), cache.length
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "position_ids": np.arange(start, start + n, dtype=np.int64)[None],
            "logits_index": np.asarray([n - 1] if last_only else np.arange(n), dtype=np.int64),
            **cache.feeds(self.past_names, n),
        }
        outs = self.target.run(None, feeds)
        return outs[0][0], outs[1][0], outs[2:]

    def prefill(self, ids: list[int], cache: TargetCache) -> tuple[np.ndarray, np.ndarray]:
        """Run and commit the prompt (in pieces where the provider bounds a call); returns the last
        position's logits [1, V] and the taps of every prompt position [n, F]."""
        step = self.prefill_chunk or len(ids)
        taps = []
        for start in range(0, len(ids), step):
            logits, piece_taps, presents = self.run_target(ids[start:start + step], cache, last_only=True)
            cache.commit(presents, len(ids[start:start + step]))
            taps.append(piece_taps)
        return logits, taps[0] if len(taps) == 1 else np.concatenate(taps)

    def project_context(self, taps: np.ndarray, start: int) -> list[np.ndarray]:
        """Tapped features of committed tokens at positions start.. -> per-layer context K/V."""
        feeds = {
            "target_hidden": taps[None].astype(np.float32, copy=False),
            "position_ids": np.arange(start, start + len(taps), dtype=np.int64)[None],
        }
        return self.drafter_context.run(None, feeds)

    def draft(self, last_token: int, start: int, block: int, cache: DraftCache) -> list[int]:
        """Draft block-1 tokens after last_token (at position start) in one drafter pass."""
        ids = [last_token] + [int(self.drafter_info["mask_token_id"])] * (block - 1)
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "position_ids": np.arange(start, start + block, dtype=np.int64)[None],
        }
        feeds.update(zip(self.block_in[2:], cache.arrays))
        return self.drafter_block.run(None, feeds)[0][0].tolist()

    def round_costs(self):
        """Cost of a round per block size in plain decode steps; measured on first use, then kept."""
        if self._round_costs is None:
            from .policy import measure_costs
            self._round_costs = measure_costs(self)
        return self._round_costs

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
