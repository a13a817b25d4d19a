"""The DFlash training objective: many anchored blocks per sequence in one packed forward pass.

For a sequence with tapped target features F[0..S-1] and tokens x[0..S-1]:
  - anchors p are sampled among supervised positions with p + B <= S;
  - block b is [x[p_b], mask x (B-1)] at positions p_b .. p_b+B-1;
  - block b attends to context positions strictly before p_b (the anchor's own feature does not exist
    at inference: the bonus token has not been through the target yet) and to its own block, both ways;
  - row k of block b predicts x[p_b + k] (no shift); row 0 is the anchor itself and carries no loss;
  - the loss weight of row k is exp(-(k-1)/gamma), normalised by the weights actually used.

With the target's greedy choices g (g[j]: its argmax after x[0..j]), row k learns g[p_b + k - 1] instead:
what the target itself would put there, which is what a draft must match to be accepted. On replies the
target generated greedily the two agree; on plain text they differ wherever the text does not follow the
target. Row k then counts only while x[p_b+1 .. p_b+k-1] are the target's choices too: past the first
disagreement the target's own continuation is unknown.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..export.drafter import DFlashDrafter


def sample_anchors(loss_mask: torch.Tensor, block: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `count` distinct sorted anchors among supervised positions p with p + block <= len."""
    s = loss_mask.shape[0]
    allowed = loss_mask.clone().bool()
    allowed[max(0, s - block + 1):] = False
    candidates = allowed.nonzero().flatten()
    if candidates.numel() == 0:
        return candidates
    pick = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[pick].sort().values


def block_mask_bias(anchors: torch.Tensor, seq_len: int, block: int) -> torch.Tensor:
    """Additive attention bias [1, 1, N*B, S + N*B]: block b sees context < p_b and its own block."""
    n = anchors.numel()
    rows = torch.arange(n * block) // block                        # block index of each query row
    ctx_ok = torch.arange(seq_len)[None, :] < anchors[rows][:, None]
    blk_ok = rows[:, None] == (torch.arange(n * block) // block)[None, :]
    allowed = torch.cat([ctx_ok, blk_ok], dim=1)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def loss_weights(block: int, gamma: float) -> torch.Tensor:
    """Per-row weights: 0 for the anchor row, exp(-(k-1)/gamma) for rows k >= 1."""
    k = torch.arange(block, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def target_labels(tokens: torch.Tensor, greedy: torch.Tensor, positions: torch.Tensor, block: int):
    """Row labels [N, B] from the target's choices, and which rows have one (see the module docstring).

    positions [N*B]: p_b + k for each block b and row k (clamped into the sequence)."""
    rows = positions.view(-1, block)
    labels = greedy[(rows - 1).clamp(min=0)]
    follows = tokens[rows] == labels                       # x[p+k] is the target's choice after x[..p+k-1]
    on_path = torch.ones_like(follows)
    on_path[:, 2:] = torch.cumprod(follows[:, 1:-1].int(), dim=1).bool()
    return labels, on_path


def dflash_loss(drafter: DFlashDrafter, features: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor,
                anchors: torch.Tensor, gamma: float, vocab_subset: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None, negative_weight: float = 1.0,
                greedy: torch.Tensor | None = None, min_weight: float = 0.0,
                soft: tuple[torch.Tensor, torch.Tensor] | None = None, soft_weight: float = 0.0,
                dpace_alpha: float | None = None):
    """Weighted cross-entropy of one packed sequence. Returns (loss, accepted-length proxy stats).

    features [S, n_taps*H] fp32, tokens [S], loss_mask [S] (1 on response tokens), anchors [N].
    greedy: the target's choices [S] (see the module docstring); without them rows learn the tokens.
    vocab_subset: optional sorted ids the softmax runs over (a reduced draft vocabulary); labels outside
    it are dropped from the loss. The checkpoint keeps the target's full LM head, so at inference every
    other token competes too: unless they are pushed down, they win the argmax (seen: 70-87% of a drafter's
    argmaxes fell outside an 8,192-token subset). `negatives`, ids sampled from outside the subset, join
    the softmax with their logits raised by log(negative_weight) (negative_weight = tokens outside / sampled),
    a sampled estimate of the rest of the partition function.
    min_weight: rows whose loss weight is below it are left out (with a small gamma the late rows weigh
    almost nothing, and their share of the LM head is pure cost); the accepted-length statistic then
    stops at the last row kept.
    soft: the target's top-k ids and probabilities after every position ([S, k] each, the feature pass's
    cache); a row's loss is then (1 - soft_weight) * CE + soft_weight * the cross-entropy against the
    target's top-k distribution (renormalised) at the position the row predicts.
    dpace_alpha: D-PACE weights in place of the exp decay: q_i = (1 - alpha) exp(-CE_i) + alpha per row
    (detached), w_j = sum over m >= j of prod over i <= m of q_i, i.e. the expected number of accepted
    rows that row j's acceptance leads to; rows without a label stop the chain.
    """
    cfg = drafter.config
    block = cfg.block_size
    s = tokens.shape[0]
    n = anchors.numel()
    offsets = torch.arange(block)
    positions = (anchors[:, None] + offsets[None, :]).flatten()            # [N*B]
    block_ids = torch.full((n, block), cfg.mask_token_id, dtype=torch.long)
    block_ids[:, 0] = tokens[anchors]
    inside = positions.clamp(max=s - 1)
    labels = tokens[inside].view(n, block)
    valid = loss_mask[inside].view(n, block).bool() & (positions.view(n, block) < s)
    if greedy is not None:
        labels, on_path = target_labels(tokens, greedy, inside, block)
        valid &= on_path

    context = drafter.context_kv(features[None], torch.arange(s)[None])
    bias = block_mask_bias(anchors, s, block)
    hidden = drafter.block_hidden(drafter.embed(block_ids.flatten()[None]), positions[None], context, bias,
                                  fused=True)
    hidden = hidden[0].view(n, block, -1)[:, 1:]                            # drop anchor rows
    labels, valid = labels[:, 1:], valid[:, 1:]
    weights = loss_weights(block, gamma)[1:].to(labels.device)
    if min_weight > 0:
        valid = valid & (weights >= min_weight)[None, :]
    head = drafter.head_weight
    correction = None
    if vocab_subset is not None:
        head = head[vocab_subset]
        remapped = torch.searchsorted(vocab_subset, labels.contiguous())
        in_subset = remapped < vocab_subset.numel()
        in_subset &= vocab_subset[remapped.clamp(max=vocab_subset.numel() - 1)] == labels
        valid = valid & in_subset
        labels = remapped.clamp(max=vocab_subset.numel() - 1)
        if negatives is not None and negatives.numel():
            head = torch.cat([head, drafter.head_weight[negatives]])
            correction = torch.zeros(head.shape[0], device=head.device)
            correction[vocab_subset.numel():] = math.log(negative_weight)
    # The head is most of a step's arithmetic; rows without a label (off the target's path, past the
    # end) skip it.
    logits = F.linear(hidden[valid].to(head.dtype), head).float()
    if correction is not None:
        logits = logits + correction
    ce = F.cross_entropy(logits, labels[valid], reduction="none")
    if dpace_alpha is not None:
        w = dpace_weights(ce.detach(), valid, dpace_alpha)[valid]
    else:
        w = weights[None, :].expand_as(labels)[valid]
    if soft is not None and soft_weight > 0:
        top_ids, top_probs = soft
        at = (inside.view(n, block)[:, 1:] - 1).clamp(min=0)[valid]  # the position each row's choice follows
        ce = (1 - soft_weight) * ce + soft_weight * soft_cross_entropy(logits, top_ids[at], top_probs[at],
                                                                      vocab_subset)
    loss = (ce * w).sum() / w.sum().clamp(min=1e-6)
    with torch.no_grad():
        correct = torch.zeros_like(valid)
        correct[valid] = logits.argmax(-1) == labels[valid]
        # Accepted length per block if drafted greedily: the run of correct rows from row 1.
        run = torch.cumprod(correct.int(), dim=1).sum(1)
    return loss, {"accept": run.float().mean().item() + 1.0, "rows": int(valid.sum())}


def dpace_weights(ce: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """[N, B-1] D-PACE weights from the labelled rows' cross-entropies (ce, in valid's order)."""
    q = torch.zeros(valid.shape, dtype=ce.dtype, device=ce.device)
    q[valid] = (1 - alpha) * torch.exp(-ce) + alpha
    reach = torch.cumprod(q, dim=1)                          # P(rows 1..m all accepted), under q
    return reach.flip(1).cumsum(1).flip(1)


def soft_cross_entropy(logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor,
                       vocab_subset: torch.Tensor | None) -> torch.Tensor:
    """Per-row cross-entropy against the target's top-k distribution, renormalised over the ids the
    softmax covers (a reduced draft vocabulary drops the rest)."""
    logp = F.log_softmax(logits, dim=-1)
    probs = top_probs.to(logp.dtype)
    if vocab_subset is not None:
        where = torch.searchsorted(vocab_subset, top_ids.contiguous()).clamp(max=vocab_subset.numel() - 1)
        probs = probs * (vocab_subset[where] == top_ids)
        top_ids = where
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-6)
    return -(probs * logp.gather(-1, top_ids)).sum(-1)


def default_gamma(block: int) -> float:
    """z-lab's decay: 7 for block 16, 5 for block 10, 4 for block 8 (interpolated elsewhere)."""
    table = {16: 7.0, 10: 5.0, 8: 4.0}
    return table.get(block, max(1.0, 7.0 * math.log(block) / math.log(16)))
