"""Llama / Qwen3 decoder written for tracing into ONNX.

The Hugging Face model is the source of the weights and of the rotary frequencies; this module is what
gets traced. Owning the forward pass keeps the graph small and identical under transformers 4.x and 5.x:
an explicit KV cache in and out, the DFlash taps as one packed output, logits only where asked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderSpec:
    """The shape of a Llama-family decoder stack, read from a Hugging Face config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qk_norm: bool = False          # Qwen3: RMSNorm over head_dim on q and k
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, config, qk_norm: bool) -> "DecoderSpec":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            qk_norm=qk_norm,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference models; fp16 variance overflows on real activations.
        dtype = x.dtype
        x = x.float()
        # x / sqrt(...), not x * rsqrt(...): ONNX Runtime fuses this form into one SimplifiedLayerNormalization
        # node (seven nodes otherwise, 61 times per step: a decode step 4 % faster on a 2-core CPU).
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Neox-style rotary embedding from precomputed inverse frequencies (any HF rope scaling)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float().clone(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    def _apply(self, fn, recurse=True):
        # module.to(fp16) moves the frequencies to another device but keeps them fp32: rounded to fp16
        # (5e-4 relative) they put position 1,000 half a radian off.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # position_ids: [b, s] -> cos, sin: [b, 1, s, head_dim]
        freqs = position_ids.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None], sin[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention written out in plain ops so every exporter and provider takes it.

    q: [b, h, s, d]; k, v: [b, kv, t, d]; bias: additive, broadcastable to [b, h, s, t] (or None).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def attend_cached(q: torch.Tensor, past_k: torch.Tensor, past_vt: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """Attention over [past ; new] that reads the cache once, in place: no concat, no per-head expansion.

    q: [b, h, s, d]; past_k: [b, kv, P, d]; past_vt: [b, kv, d, P] (values stored transposed); k, v:
    [b, kv, s, d] for the new positions; bias: additive [b, 1, s, P + s]. Query head j reads KV head
    j // groups (HF's repeat_interleave), so the h query heads fold into kv groups of g * s rows each.
    Both cache products put the cache on the left (K q^T, V^T p^T): a GEMM streams its left operand as
    stored but repacks its right one on every call, which for the cache would mean reading and writing
    all of it each decode step. Only the few query rows are repacked.
    """
    b, h, s, d = q.shape
    kv, past = k.shape[1], past_k.shape[2]
    groups = h // kv
    qg = q.reshape(b, kv, groups * s, d).float()
    past_scores = torch.matmul(past_k.float(), qg.transpose(-1, -2)).transpose(-1, -2)
    scores = torch.cat([past_scores, torch.matmul(qg, k.float().transpose(-1, -2))], dim=-1) * (d ** -0.5)
    scores = scores.view(b, kv, groups, s, past + s) + bias[:, :, None]
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(b, kv, groups * s, past + s)
    past_out = torch.matmul(past_vt, probs[..., :past].transpose(-1, -2)).transpose(-1, -2)
    out = past_out + torch.matmul(probs[..., past:], v)
    return out.reshape(b, h, s, d)


def attend_fused(q: torch.Tensor, past_k: torch.Tensor, past_vt: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """attend_cached's result through torch's fused attention, for training only (never exported).

    In bf16, dflash-train's feature pass over 512-token pieces runs 2.2x faster this way (650 -> 1,420
    tok/s on 2 cores) and picks the same argmax as the fp32 target as often (97.6 against 97.8 %)."""
    keys = torch.cat([past_k, k], dim=2)
    values = torch.cat([past_vt.transpose(-1, -2), v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype), enable_gqa=True)


def cache_shapes(layers: int, kv_heads: int, head_dim: int, slots: int, batch: int = 1) -> list[tuple[int, ...]]:
    """A KV cache's buffers, per layer keys [b, kv, slots, d] and values stored transposed, [b, kv, d, slots]."""
    return [shape for _ in range(layers) for shape in ((batch, kv_heads, slots, head_dim),
                                                       (batch, kv_heads, head_dim, slots))]


def write_slots(buffer: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, axis: int) -> torch.Tensor:
    """buffer with `new` written at cache slots `positions` [s] along `axis` (slot i holds position i).

    Exports as ScatterElements, which ONNX Runtime runs in place when the runtime binds the graph's output to
    the input's memory: a step writes its s new rows and copies nothing else.
    """
    shape = [1] * new.dim()
    shape[axis] = -1
    return buffer.scatter(axis, positions.reshape(shape).expand_as(new), new)


@torch.library.custom_op("dflash_edge::values_product", mutates_args=())
def values_product(values_t: torch.Tensor, probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The attention's weighted sum of cached values, cache on the left, and the heads laid out for o_proj:
    values_t [b, kv, parts, m, slots] (head_dim split in parts of m), probs [b, kv, groups, s, slots],
    positions [s] -> [b, s, kv * groups * parts * m].

    A matmul here. The export writes it as one MatMul, or for graphs that round activations (int8) in
    chunks of positions (trace.values_product_onnx) so that a verify's rows get the sums of single steps
    bit for bit. It is an op of its own because the chunk count follows the sequence length, which
    torch.export would pin to the example's; `positions` gives that length, the same input in every layer
    so that ONNX Runtime computes the chunk plan once per call.
    """
    b, kv, parts, m, slots = values_t.shape
    groups, s = probs.shape[2], probs.shape[3]
    out = torch.matmul(values_t, probs.reshape(b, kv, 1, groups * s, slots).transpose(-1, -2))
    return out.view(b, kv, parts, m, groups, s).permute(0, 5, 1, 4, 2, 3).reshape(b, s, -1)


@values_product.register_fake
def _(values_t: torch.Tensor, probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    b, kv, parts, m, _ = values_t.shape
    return values_t.new_empty(b, probs.shape[3], kv * probs.shape[2] * parts * m)


def attend_buffer(q: torch.Tensor, keys: torch.Tensor, values_t: torch.Tensor, bias: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """Attention over a whole cache buffer that already holds the new positions' K/V.

    q: [b, h, s, d]; keys: [b, kv, slots, d]; values_t: [b, kv, d, slots] (stored transposed); bias: additive
    [b, 1, s, slots]; positions: [s]. Returns [b, s, h * d], the layout o_proj takes. Same folding of query
    heads into KV groups, and the same cache-on-the-left products, as attend_cached.

    ONNX Runtime's CPU MatMul gives each product of a batch to one thread, so with an odd number of KV
    heads (SmolLM2 has 3) one of two threads did twice the other's work. With an odd count each head's
    products are halved, keys by slot and values by feature (both are views, and neither changes a sum),
    which needs an even number of slots: the runtime allocates them 128 at a time. At 2,000 tokens of
    context this cut a 2-core decode step's attention by a fifth.
    """
    b, h, s, d = q.shape
    kv, slots = keys.shape[1], keys.shape[2]
    groups = h // kv
    parts = 2 if kv % 2 else 1
    qg = q.reshape(b, kv, 1, groups * s, d)
    scores = torch.matmul(keys.reshape(b, kv, parts, -1, d), qg.transpose(-1, -2))
    scores = scores.reshape(b, kv, slots, groups * s).transpose(-1, -2).float() * (d ** -0.5)
    scores = scores.view(b, kv, groups, s, slots) + bias[:, :, None]
    probs = torch.softmax(scores, dim=-1).to(values_t.dtype)
    return values_product(values_t.reshape(b, kv, parts, -1, slots), probs, positions)


def lm_head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[b, k, H] x [V, H] -> [b, k, V] fp32.

    Written as a 2-D linear so the exporter emits Gemm(transB=1) over the weight as stored: a
    Transpose + MatMul would make ONNX Runtime fold a second, transposed copy of the vocab matrix.
    """
    b, k, h_dim = h.shape
    return F.linear(h.reshape(b * k, h_dim), weight).reshape(b, k, -1).float()


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        h, i, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        h, d, b = spec.hidden_size, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=b)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=b)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=b)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=b)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)

    def project_q(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.spec.num_heads, self.spec.head_dim)
        if self.spec.qk_norm:
            q = self.q_norm(q)
        return apply_rotary(q.transpose(1, 2), cos, sin)

    def project_kv(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, rotated) and values for x: [b, s, h] -> [b, kv, s, d] each."""
        b, s, _ = x.shape
        k = self.k_proj(x).view(b, s, self.spec.num_kv_heads, self.spec.head_dim)
        if self.spec.qk_norm:
            k = self.k_norm(k)
        v = self.v_proj(x).view(b, s, self.spec.num_kv_heads, self.spec.head_dim)
        return apply_rotary(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, s, -1))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attend = attend_cached  # TargetModel.fuse_attention swaps in attend_fused for training

    def forward(self, x, cos, sin, past_k, past_vt, bias):
        """Causal step: the new hidden state and the new positions' keys [b,kv,s,d] and values [b,kv,d,s]."""
        h = self.input_layernorm(x)
        q = self.self_attn.project_q(h, cos, sin)
        k, v = self.self_attn.project_kv(h, cos, sin)
        x = x + self.self_attn.output(self.attend(q, past_k, past_vt, k, v, bias))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v.transpose(-1, -2)

    def forward_in_buffer(self, x, cos, sin, keys, values_t, positions, bias):
        """Causal step over a cache buffer: writes the new positions' K/V into it (slot = position) and
        attends over the updated buffer. Returns the hidden state and the updated keys and values."""
        h = self.input_layernorm(x)
        q = self.self_attn.project_q(h, cos, sin)
        k, v = self.self_attn.project_kv(h, cos, sin)
        keys = write_slots(keys, k, positions, 2)
        values_t = write_slots(values_t, v.transpose(-1, -2), positions, 3)
        x = x + self.self_attn.o_proj(attend_buffer(q, keys, values_t, bias, positions))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, keys, values_t


class TargetModel(nn.Module):
    """The target LLM as traced: one graph for prefill and verify.

    forward(input_ids [b,s], position_ids [b,s], attention_mask [b,past+s], logits_index [k], *past)
      -> logits [b,k,vocab] (fp32), aux_hidden_states [b,s,n_taps*hidden] (fp32), *present
    logits_index picks the positions whose logits are computed (the last one at prefill, all at verify),
    so a long prompt never materialises [prompt, vocab] logits.

    The cache belongs to the caller: `past` is a buffer of `past` slots of which attention_mask marks the
    filled ones (unfilled slots hold any finite value), and `present` is the K/V of the s new positions
    only, for the caller to write into its buffer. Nothing in the graph copies the cache.
    """

    def __init__(self, spec: DecoderSpec, vocab_size: int, rotary: Rotary, tap_layer_ids: list[int],
                 tie_word_embeddings: bool):
        super().__init__()
        self.spec = spec
        self.tap_layer_ids = list(tap_layer_ids)
        self.embed_tokens = nn.Embedding(vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = rotary
        self.tie_word_embeddings = tie_word_embeddings
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, vocab_size, bias=False)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    def fuse_attention(self) -> "TargetModel":
        """Attention through torch's fused kernel (attend_fused): for dflash-train's regeneration and
        feature pass; a module exported after this would trace it, so the exporter never calls it."""
        for layer in self.layers:
            layer.attend = attend_fused
        return self

    def cache_shapes(self, batch: int, slots: int) -> list[tuple[int, ...]]:
        """Shapes of `past` (see cache_shapes)."""
        return cache_shapes(len(self.layers), self.spec.num_kv_heads, self.spec.head_dim, slots, batch)

    def empty_cache(self, batch: int, device=None) -> list[torch.Tensor]:
        dtype = self.embed_tokens.weight.dtype
        return [torch.zeros(shape, device=device, dtype=dtype) for shape in self.cache_shapes(batch, 0)]

    def forward(self, input_ids, position_ids, attention_mask, logits_index, *past, argmax: bool = False,
                top_k: int = 0):
        """argmax=True returns the ids of the largest logits [b, k] in place of the logits (training's
        feature pass wants the target's choice at every position, and logits for all of them would be
        gigabytes); with top_k as well, the top_k likeliest ids [b, k, top_k] and their probabilities
        follow them (soft targets)."""
        s = input_ids.shape[1]
        total = attention_mask.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        # Query i sits at cache slot total - s + i; it sees slots up to itself that the mask keeps.
        query_slot = torch.arange(s, device=x.device)[:, None] + (total - s)
        key_slot = torch.arange(total, device=x.device)[None, :]
        visible = (key_slot <= query_slot)[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = torch.where(visible, 0.0, torch.finfo(torch.float32).min)

        taps, present = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, past[2 * i], past[2 * i + 1], bias)
            present += [k, v]
            self._tap(i, x, taps)
        h = self.norm(x.index_select(1, logits_index))
        if argmax:
            ids, top_ids, top_probs = [], [], []
            for rows in h.reshape(-1, h.shape[-1]).split(1024):  # a 1,024-row piece of logits at a time
                logits = F.linear(rows, self.head_weight()).float()
                ids.append(logits.argmax(-1))
                if top_k:
                    best = logits.softmax(-1).topk(top_k, dim=-1)
                    top_ids.append(best.indices)
                    top_probs.append(best.values)
            ids = torch.cat(ids).view(h.shape[:2])
            if top_k:
                return (ids, torch.cat(top_ids).view(*h.shape[:2], top_k),
                        torch.cat(top_probs).view(*h.shape[:2], top_k), self._pack_taps(taps), *present)
            return (ids, self._pack_taps(taps), *present)
        return (lm_head(h, self.head_weight()), self._pack_taps(taps), *present)

    def _tap(self, i: int, x: torch.Tensor, taps: list) -> None:
        if i in self.tap_layer_ids:
            # HF's hidden_states[L] (tap id L-1) is taken after the final norm; match it exactly.
            taps.append(self.norm(x) if i == len(self.layers) - 1 else x)

    def _pack_taps(self, taps: list) -> torch.Tensor:
        # Taps in list order, each the output of decoder block l (HF hidden_states[l + 1]).
        by_id = dict(zip(sorted(set(self.tap_layer_ids)), taps))
        return torch.cat([by_id[i] for i in self.tap_layer_ids], dim=-1).float()


class BufferedTarget(nn.Module):
    """The target as exported (graph format 4): batch 1, the cache written in place.

    forward(input_ids [1,s], position_ids [1,s], logits_index [k], *cache)
      -> logits [1,k,vocab] fp32, next_token_ids [1,k] (their argmax), aux_hidden_states [1,s,n_taps*hidden],
         *cache with the s new positions written at slots position_ids
    The cache is addressed by position: slot i holds position i, and a query at position p sees slots
    0..p. Slots past the committed length hold stale K/V of rejected drafts, which the next step's writes
    overwrite before any query can see them; so rollback is the caller lowering its length, and the
    caller binds each present output to its past input's memory so that nothing is copied.
    """

    def __init__(self, target: TargetModel):
        super().__init__()
        self.target = target

    def forward(self, input_ids, position_ids, logits_index, *cache):
        t = self.target
        x = t.embed_tokens(input_ids)
        cos, sin = t.rotary(position_ids, x.dtype)
        positions = position_ids[0]
        slots = torch.arange(cache[0].shape[2], device=x.device)
        visible = slots[None, :] <= positions[:, None]
        bias = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]
        taps, updated = [], []
        for i, layer in enumerate(t.layers):
            x, keys, values_t = layer.forward_in_buffer(x, cos, sin, cache[2 * i], cache[2 * i + 1], positions, bias)
            updated += [keys, values_t]
            t._tap(i, x, taps)
        logits = lm_head(t.norm(x.index_select(1, logits_index)), t.head_weight())
        return (logits, logits.argmax(-1), t._pack_taps(taps), *updated)


def load_target_from_hf(hf_model, tap_layer_ids: list[int], qk_norm: bool,
                        dtype: torch.dtype = torch.float32) -> TargetModel:
    """Copy a Hugging Face LlamaForCausalLM / Qwen3ForCausalLM into a TargetModel, strictly."""
    config = hf_model.config
    spec = DecoderSpec.from_hf_config(config, qk_norm=qk_norm)
    rotary_src = hf_model.model.rotary_emb
    rotary = Rotary(rotary_src.inv_freq, getattr(rotary_src, "attention_scaling", 1.0))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    model = TargetModel(spec, config.vocab_size, rotary, tap_layer_ids, tied)
    src = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if tied:
        src.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(src, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"weights do not match the {type(hf_model).__name__} layout: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval()
