"""Batched generation with the frozen target, for dflash-train's regeneration (never exported).

The exported step (TargetModel.forward) hands back the new positions' K/V for the caller to append, which
in eager torch copies the whole cache every step, and its attention concatenates once more. Here each
layer's keys and values live in one buffer sized for prompt + reply: a step writes its slot in place and
attends over a view of the filled slots. Rows that finish leave the batch, so late steps run only the
replies still going.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention without expanding the cache: the query heads of each KV head are folded
    into its rows (query head j reads KV head j // groups, as HF's repeat_interleave does).

    q [b, h, s, d]; keys, values [b, kv, t, d]; bias [b, 1, s, t] additive."""
    b, h, s, d = q.shape
    kv = keys.shape[1]
    groups = h // kv
    folded = q.reshape(b, kv, groups * s, d)
    mask = bias if groups == 1 or s == 1 else bias.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask.to(q.dtype))
    return out.reshape(b, h, s, d)


def _step(target, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor, keys: list, values: list,
          start: int) -> torch.Tensor:
    """Run ids [b, s] at cache slots start..start+s-1; returns the last position's logits [b, vocab]."""
    x = target.embed_tokens(ids)
    cos, sin = target.rotary(positions, x.dtype)
    end = start + ids.shape[1]
    for layer, k_buf, v_buf in zip(target.layers, keys, values):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.project_q(h, cos, sin)
        k, v = attn.project_kv(h, cos, sin)
        k_buf[:, :, start:end] = k
        v_buf[:, :, start:end] = v
        x = x + attn.output(_attend(q, k_buf[:, :, :end], v_buf[:, :, :end], bias))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return F.linear(target.norm(x[:, -1]), target.head_weight()).float()


def _nucleus_pick(sorted_probs: torch.Tensor, order: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    # Keep a token while the mass before it is under top_p: the first token always stays.
    kept = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
    return order.gather(-1, torch.multinomial(kept, 1, generator=generator))[:, 0]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), cut to the nucleus of mass top_p."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    # The nucleus is looked for among the 512 likeliest tokens (sorting a 49k vocabulary for 128 rows took
    # 650 ms a step here, 15x the partial sort); rows whose nucleus is wider are sorted whole: exact both ways.
    top, order = probs.topk(min(512, probs.shape[-1]), dim=-1)
    out = _nucleus_pick(top, order, top_p, generator)
    wide = top.sum(-1) < top_p
    if wide.any():
        out[wide] = _nucleus_pick(*probs[wide].sort(dim=-1, descending=True), top_p, generator)
    return out


@torch.no_grad()
def greedy_batch(target, prompts: list[list[int]], max_new_tokens: int, stops: set[int], device: str,
                 temperature: float = 0.0, generator: torch.Generator | None = None,
                 top_p: float = 1.0) -> list[list[int]]:
    """Replies to a batch of prompts (token ids) from the target module (export/modeling.TargetModel).

    Prompts are left-padded; padding is masked out and positions count real tokens only. A reply ends at a
    stop id (kept) or at max_new_tokens. temperature > 0 samples instead of taking the argmax, from the
    smallest set of tokens whose probability reaches top_p."""
    n, width = len(prompts), max(len(p) for p in prompts)
    slots = width + max_new_tokens
    spec, dtype = target.spec, target.embed_tokens.weight.dtype
    shape = (n, spec.num_kv_heads, slots, spec.head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in target.layers]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in target.layers]
    ids = torch.zeros(n, width, dtype=torch.long)
    filled = torch.zeros(n, slots, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        filled[r, width - len(p):width] = True
    ids, filled = ids.to(device), filled.to(device)
    positions = (filled[:, :width].long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    visible = causal[None] & filled[:, None, :width]
    rows = list(range(n))              # the reply each batch row writes; -1 once it has ended
    replies: list[list[int]] = [[] for _ in range(n)]
    start = 0
    for _ in range(max_new_tokens):
        end = start + ids.shape[1]
        bias = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[:, None]
        logits = _step(target, ids, positions, bias, keys, values, start)
        if temperature > 0:
            nxt = sample(logits, temperature, top_p, generator)
        else:
            nxt = logits.argmax(-1)
        for b, token in enumerate(nxt.tolist()):
            if rows[b] >= 0:
                replies[rows[b]].append(token)
                if token in stops:
                    rows[b] = -1
        going = [b for b, r in enumerate(rows) if r >= 0]
        if not going:
            break
        if len(going) <= 3 * len(rows) // 4:
            # Dropping ended rows copies the cache once, about a step's worth of memory traffic: worth it
            # once a quarter of the batch is only computing replies nobody reads.
            keep = torch.tensor(going, device=device)
            keys = [k.index_select(0, keep) for k in keys]
            values = [v.index_select(0, keep) for v in values]
            filled, nxt, positions = filled[keep], nxt[keep], positions[keep]
            rows = [rows[b] for b in going]
        filled[:, end] = True
        visible = filled[:, None, :end + 1]
        ids, positions, start = nxt[:, None], positions[:, -1:] + 1, end
    return replies
