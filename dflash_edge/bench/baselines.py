"""What users would run instead of dflash-edge, timed on the same prompts: transformers generate (PyTorch
eager) on the same weights. Imported only when torch and transformers are installed."""
from __future__ import annotations

import time


class TransformersBaseline:
    """Greedy `generate` of the export's source weights, timed per token with a streamer."""

    name = "transformers"

    def __init__(self, source: str, threads: int | None, stop_ids: set[int]):
        import torch

        from ..export.sources import load_hf, resolve_model

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model, _, _ = load_hf(resolve_model(source), log=lambda *a: None)
        self.stop_ids = sorted(stop_ids)
        self.version = __import__("transformers").__version__

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value):  # first call: the prompt; then one call per new token
                times.append(time.perf_counter())

            def end(self):
                pass

        ids = self.torch.tensor([prompt_ids])
        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[0],
                                      streamer=Clock())
        t_end = time.perf_counter()
        tokens = out[0, len(prompt_ids):].tolist()
        first = times[1] if len(times) > 1 else t_end
        decode_s = t_end - first
        return {"tokens": tokens, "new_tokens": len(tokens), "ttft_s": first - t0, "decode_s": decode_s,
                "decode_tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
                "total_s": t_end - t0}
