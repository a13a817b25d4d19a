"""The objective's optional terms: D-PACE row weights and soft targets from the target's top-k."""
import torch
import torch.nn.functional as F

from dflash_edge.train.objective import dflash_loss, dpace_weights, soft_cross_entropy


def test_dpace_weights_follow_the_definition():
    """w_j = sum over m >= j of prod over i <= m of q_i, with q = (1 - alpha) exp(-CE) + alpha."""
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1, 2:] = False  # a block that leaves the target's path after its second row
    ce = torch.rand(int(valid.sum()), generator=g) * 3
    alpha = 0.2
    got = dpace_weights(ce, valid, alpha)
    q = torch.zeros(3, 5)
    q[valid] = (1 - alpha) * torch.exp(-ce) + alpha
    for b in range(3):
        for j in range(5):
            want = sum(float(torch.prod(q[b, :m + 1])) for m in range(j, 5))
            assert abs(float(got[b, j]) - want) < 1e-5
    assert torch.all(got[1, 2:] == 0)
    # Perfect rows (CE 0) weigh the number of rows they lead to: 5, 4, ..., 1.
    assert dpace_weights(torch.zeros(5), torch.ones(1, 5, dtype=torch.bool), 0.1).tolist() == [[5, 4, 3, 2, 1]]


def test_soft_cross_entropy_on_a_one_hot_target_is_the_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 30, generator=g)
    labels = torch.randint(30, (6,), generator=g)
    top_ids = torch.stack([labels, (labels + 1) % 30], 1)
    top_probs = torch.tensor([[1.0, 0.0]] * 6)
    assert torch.allclose(soft_cross_entropy(logits, top_ids, top_probs, None), F.cross_entropy(logits, labels,
                                                                                                reduction="none"))
    # Top-k mass is renormalised; ids outside a reduced vocabulary drop out of it.
    subset = torch.arange(0, 30, 2)
    even = (labels // 2) * 2
    pair = torch.stack([even, even + 1], 1)
    got = soft_cross_entropy(logits[:, :15], pair, torch.tensor([[0.3, 0.6]] * 6), subset)
    assert torch.allclose(got, F.cross_entropy(logits[:, :15], even // 2, reduction="none"))


def _inputs():
    """A small random drafter (block 4, vocab 40, two taps of width 16) and one sequence for it."""
    from dflash_edge.export.drafter import DrafterConfig, random_drafter

    cfg = DrafterConfig.from_dict({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                                   "vocab_size": 40, "mask_token_id": 39, "target_layer_ids": [0, 1],
                                   "block_size": 4})
    drafter = random_drafter(cfg, std=0.3)
    g = torch.Generator().manual_seed(0)
    drafter.attach_target(torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g))
    tokens = torch.randint(0, 39, (14,), generator=g)
    return drafter, torch.randn(14, 32, generator=g), tokens, torch.ones(14), torch.tensor([1, 4, 8])


def test_soft_targets_that_agree_with_the_labels_change_nothing():
    drafter, features, tokens, mask, anchors = _inputs()
    greedy = torch.cat([tokens[1:], tokens[:1]])  # the target's choice after position j is the next token
    top_ids = torch.stack([greedy, (greedy + 1) % 40, (greedy + 2) % 40], 1)
    one_hot = torch.tensor([[1.0, 0.0, 0.0]]).expand(len(tokens), 3)
    hard, _ = dflash_loss(drafter, features, tokens, mask, anchors, 4.0, greedy=greedy)
    soft, _ = dflash_loss(drafter, features, tokens, mask, anchors, 4.0, greedy=greedy,
                          soft=(top_ids, one_hot), soft_weight=1.0)
    assert torch.allclose(hard, soft)
    spread = torch.tensor([[0.5, 0.3, 0.2]]).expand(len(tokens), 3)
    other, _ = dflash_loss(drafter, features, tokens, mask, anchors, 4.0, greedy=greedy,
                           soft=(top_ids, spread), soft_weight=1.0)
    assert not torch.allclose(hard, other)


def test_dpace_loss_trains_the_drafter():
    drafter, features, tokens, mask, anchors = _inputs()
    loss, info = dflash_loss(drafter, features, tokens, mask, anchors, 7.0, dpace_alpha=0.1)
    assert torch.isfinite(loss) and info["rows"] > 0
    loss.backward()
    assert drafter.fc.weight.grad is not None and drafter.fc.weight.grad.abs().sum() > 0
