"""What users would run instead of dflash-edge, timed on the same prompts and weights: transformers
`generate` (PyTorch eager), and Optimum's ORTModelForCausalLM (ONNX Runtime, its own export). Imported
only when torch and transformers are installed; Optimum only when optimum-onnx is."""
from __future__ import annotations

import tempfile
import time


class GenerateBaseline:
    """Greedy `generate` through the transformers API, timed per token with a streamer."""

    name = ""

    def __init__(self, model, stop_ids: set[int]):
        import torch

        self.torch = torch
        self.model = model
        self.stop_ids = sorted(stop_ids)

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


class TransformersBaseline(GenerateBaseline):
    name = "transformers"

    def __init__(self, source: str, threads: int | None, stop_ids: set[int]):
        import torch

        from ..export.sources import load_hf, resolve_model

        if threads:
            torch.set_num_threads(threads)
        model, self.tokenizer, _ = load_hf(resolve_model(source), log=lambda *a: None)
        super().__init__(model, stop_ids)
        self.version = __import__("transformers").__version__


class OptimumBaseline(GenerateBaseline):
    """Optimum's own ONNX export of the same weights, run by ORTModelForCausalLM (KV cache, CPU)."""

    name = "optimum"

    def __init__(self, hf_model, tokenizer, threads: int | None, stop_ids: set[int], log=print):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        self._folder = tempfile.TemporaryDirectory(prefix="dflash-bench-optimum-")
        hf_model.save_pretrained(self._folder.name)
        tokenizer.save_pretrained(self._folder.name)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        log("  exporting the target with Optimum for its baseline (once per run)")
        model = ORTModelForCausalLM.from_pretrained(self._folder.name, export=True, use_cache=True,
                                                    provider="CPUExecutionProvider", session_options=options)
        super().__init__(model, stop_ids)
        from importlib.metadata import version
        self.version = version("optimum-onnx")
