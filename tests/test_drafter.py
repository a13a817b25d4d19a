"""The drafter's z-lab checkpoint format: config variants, refusals, round trips, tap-id defaults."""
import json

import pytest
import torch

from dflash_edge.errors import UserError
from dflash_edge.export.drafter import (DrafterConfig, default_tap_layer_ids, load_drafter, random_drafter,
                                        save_drafter)

BASE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 50, "num_target_layers": 8}


@pytest.mark.parametrize("layers,expected", [(36, [1, 9, 17, 25, 33]), (32, [1, 8, 15, 22, 29]),
                                             (40, [1, 10, 19, 28, 37]), (64, [1, 16, 31, 46, 61])])
def test_default_tap_ids_match_released_checkpoints(layers, expected):
    assert default_tap_layer_ids(layers) == expected


def test_fields_are_read_from_dflash_config_or_top_level():
    nested = DrafterConfig.from_dict({**BASE, "block_size": 10,
                                      "dflash_config": {"mask_token_id": 7, "target_layer_ids": [1, 3]}})
    top = DrafterConfig.from_dict({**BASE, "block_size": 10, "mask_token_id": 7, "target_layer_ids": [1, 3]})
    for c in (nested, top):
        assert (c.block_size, c.mask_token_id, c.target_layer_ids) == (10, 7, [1, 3])
    # Without explicit ids, z-lab's rule over num_target_layers with one tap per draft layer.
    assert DrafterConfig.from_dict({**BASE, "mask_token_id": 7}).target_layer_ids == default_tap_layer_ids(8, 2)


@pytest.mark.parametrize("extra,word", [
    ({"architectures": ["DFlash2DraftModel"]}, "DFlash2"),
    ({"dflash_config": {"mask_token_id": 1, "projector_type": "domino"}}, "domino"),
    ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 2048}, "sliding-window"),
    ({"dflash_config": {"mask_token_id": 1, "causal": True}}, "causal"),
])
def test_unsupported_checkpoints_are_refused_by_name(extra, word):
    cfg = {**BASE, "mask_token_id": 1, **extra}
    with pytest.raises(UserError, match=word):
        DrafterConfig.from_dict(cfg)


def test_missing_mask_token_is_refused():
    with pytest.raises(UserError, match="mask_token_id"):
        DrafterConfig.from_dict(BASE)


def test_save_and_load_round_trip_with_zlab_tensor_names(tmp_path):
    from safetensors.torch import load_file

    config = DrafterConfig.from_dict({**BASE, "mask_token_id": 1, "target_layer_ids": [1, 4, 6]})
    model = random_drafter(config, seed=3, std=0.1)
    save_drafter(model, tmp_path, dtype=torch.float32)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.1.self_attn.q_norm.weight",
            "layers.0.self_attn.k_norm.weight", "layers.0.mlp.gate_proj.weight",
            "layers.1.post_attention_layernorm.weight"} <= names
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["DFlashDraftModel"]
    assert saved["dflash_config"]["target_layer_ids"] == [1, 4, 6]
    loaded = load_drafter(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_prefixed_names_and_shared_tensors_are_accepted(tmp_path):
    from safetensors.torch import save_file

    config = DrafterConfig.from_dict({**BASE, "mask_token_id": 1})
    model = random_drafter(config)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(50, 32)  # some exports ship the target's tables
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "mask_token_id": 1}))
    assert torch.equal(load_drafter(tmp_path).fc.weight, model.fc.weight)


def test_mismatched_weights_are_refused(tmp_path):
    config = DrafterConfig.from_dict({**BASE, "mask_token_id": 1})
    save_drafter(random_drafter(config), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="missing"):
        load_drafter(tmp_path)


def test_context_projected_in_pieces_equals_projected_at_once():
    """The runtime projects committed context incrementally; the drafter must not care."""
    config = DrafterConfig.from_dict({**BASE, "mask_token_id": 1, "target_layer_ids": [1, 4]})
    model = random_drafter(config, std=0.1)
    feats = torch.randn(1, 9, 64) * 30
    pos = torch.arange(9)[None]
    whole = model.context_kv(feats, pos)
    parts = [torch.cat(p, dim=2) for p in zip(model.context_kv(feats[:, :4], pos[:, :4]),
                                                model.context_kv(feats[:, 4:], pos[:, 4:]))]
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b)


def test_shipped_smollm2_drafter_fits_its_target_and_is_small():
    from dflash_edge.export.sources import SHIPPED_DRAFTERS

    folder = SHIPPED_DRAFTERS["smollm2-135m"]  # tests/test_smollm2.py exports with it, as make demo does
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 40 * 2**20
    cfg = DrafterConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert (cfg.hidden_size, cfg.vocab_size, cfg.block_size) == (576, 49152, 16)
    assert cfg.target_layer_ids == default_tap_layer_ids(30)
    report = json.loads((folder / "training_report.json").read_text())
    assert report["steps"] > 0 and report["supervised_tokens"] > 100_000
