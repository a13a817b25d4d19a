"""A GGUF file's tensors seen as a Hugging Face checkpoint, one tensor at a time, for the streamed export.

The file is memory-mapped by gguf's reader (the same package transformers loads GGUF with); each tensor is
dequantized to fp32 when asked for, renamed to its Hugging Face name, and for Llama its query and key rows
are put back in Hugging Face's order: llama.cpp's converter interleaves the two halves of each head's
rotary dimensions, transformers undoes it on load, and so does this. The weights equal transformers'
load of the same file bit for bit (tests/test_gguf_source.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

# GGUF name (after blk.N.) -> Hugging Face name (after model.layers.N.)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
# Not weights of the decoder: llama.cpp stores Llama 3's rope scaling as a tensor; the config carries it.
SKIPPED = {"rope_freqs.weight"}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter stores each head's rows as pairs (i, i + d/2) interleaved; back to halves."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GGUFSource:
    """names()/shape()/get() over a GGUF file, in Hugging Face's names and layouts, dequantized to fp32."""

    def __init__(self, path: Path, config, family: str):
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        self.path = path
        # Query and key rows are permuted for Llama only (llama.cpp's converter does it for that family).
        self.heads = ({"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
                      if family == "llama" else {})
        self._tensors = {}
        unknown = []
        for tensor in self.reader.tensors:
            name = hf_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor
            elif tensor.name not in SKIPPED:
                unknown.append(tensor.name)
        if unknown:
            raise UserError(f"{path}: tensors this exporter does not know ({', '.join(unknown[:3])}); "
                            "it reads Llama and Qwen3 GGUF files")

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # GGUF lists dimensions innermost first

    def get(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        if name not in self._tensors:
            raise UserError(f"{self.path} has no tensor {name!r}")
        tensor = self._tensors[name]
        try:
            weight = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(f"{self.path}: {tensor.name} is {tensor.tensor_type.name}, which gguf cannot "
                            "dequantize") from None
        # A copy: an F32 tensor dequantizes to a read-only view of the mapped file.
        weight = weight.reshape(self.shape(name)).astype(np.float32, copy=True)
        projection = name.split(".")[-2]
        if projection in self.heads:
            weight = np.ascontiguousarray(unpermute(weight, self.heads[projection]))
        return torch.from_numpy(weight)
