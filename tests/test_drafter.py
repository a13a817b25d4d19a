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
    """The shipped drafter is what its README and training report say, figure for figure."""
    import math
    import re

    from safetensors import safe_open

    from dflash_edge.export.drafter import drafter_parameter_shapes, read_draft_vocab
    from dflash_edge.export.sources import SHIPPED_DRAFTERS

    folder = SHIPPED_DRAFTERS["smollm2-135m"]  # tests/test_smollm2.py exports with it, as make demo does
    cfg = DrafterConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert (cfg.hidden_size, cfg.vocab_size, cfg.block_size, cfg.mask_token_id) == (576, 49152, 16, 0)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size) == (1, 9, 3, 1536)
    assert cfg.target_layer_ids == default_tap_layer_ids(30) == [1, 8, 14, 20, 27]

    # The file holds exactly the config's tensors in bf16, so its size is 2 bytes a parameter plus the
    # safetensors header (8 bytes of length and a JSON index of the 14 tensors, under 4 KiB).
    shapes = drafter_parameter_shapes(cfg)
    params = sum(math.prod(s) for s in shapes.values())
    weights = folder / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == shapes
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert 0 < weights.stat().st_size - 2 * params <= 4096, (weights.stat().st_size, params)

    report = json.loads((folder / "training_report.json").read_text())
    stages = report["stages"]
    assert report["steps"] == stages[-1]["steps"][1] and stages[0]["steps"][0] == 0
    assert all(a["steps"][1] == b["steps"][0] for a, b in zip(stages, stages[1:]))  # the runs join up
    assert report["history"][-1]["step"] <= report["steps"]
    assert "Q4_1" in report["target"] and "--draft-vocab 8192" in report["command"]
    vocab = read_draft_vocab(folder, cfg.vocab_size)
    coverage = json.loads((folder / "draft_vocab.json").read_text())["label_coverage"]

    # The README's figures are the report's and the files' own.
    readme = " ".join((folder / "README.md").read_text().split())

    def figure(pattern: str) -> str:
        found = re.search(pattern, readme)
        assert found, f"the README no longer says {pattern!r}"
        return found.group(1)

    def number(text: str) -> float:
        return float(text.replace(",", ""))

    assert number(figure(r"([\d.]+) M parameters")) == round(params / 1e6, 1)
    assert number(figure(r"parameters, ([\d.]+) MB")) == round(weights.stat().st_size / 1e6)
    assert number(figure(r"([\d,]+) steps")) == report["steps"]
    assert number(figure(r"([\d,]+) reply tokens")) == report["supervised_tokens"]
    assert number(figure(r"([\d,]+) offline prompts")) == report["sequences"]
    # Each stage's minutes are its own run's (a resumed run's clock starts at zero), the report's the last run's.
    assert report["minutes"] == stages[-1]["minutes"]
    assert [number(m) for m in figure(r"\(([\d.]+ \+ [\d.]+) minutes").split(" + ")] == [
        round(stage["minutes"]) for stage in stages]
    assert number(figure(r"([\d.]+) minutes of data preparation")) == report["data_preparation_minutes"]
    assert number(figure(r"the ([\d,]+) most frequent")) == len(vocab) == 8192
    assert number(figure(r"\(([\d.]+) % of the training labels")) == round(100 * coverage, 1)
    assert figure(r"taps ([\d, ]+)\.").split(", ") == [str(i) for i in cfg.target_layer_ids]
    assert figure(r"block size (\d+)") == str(cfg.block_size) and figure(r"mask token (\d+)") == str(cfg.mask_token_id)


OK = {**BASE, "mask_token_id": 1, "num_target_layers": 8, "target_layer_ids": [1, 4]}


@pytest.mark.parametrize("change,field", [
    ({"hidden_size": "32"}, "hidden_size"),
    ({"hidden_size": 32.0}, "hidden_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 30, "head_dim": None}, "hidden_size 30 is not a multiple"),
    ({"head_dim": 7}, "head_dim"),
    ({"intermediate_size": -64}, "intermediate_size"),
    ({"intermediate_size": 10**12}, "intermediate_size"),
    ({"vocab_size": 10**5000}, "vocab_size"),
    ({"hidden_size": 2**16, "intermediate_size": 2**19, "num_hidden_layers": 512}, "parameters"),
    ({"num_target_layers": 0}, "num_target_layers"),
    ({"target_layer_ids": [1, 8]}, "target_layer_ids"),
    ({"target_layer_ids": [-1]}, "target_layer_ids"),
    ({"target_layer_ids": ["1"]}, "target_layer_ids"),
    ({"target_layer_ids": []}, "target_layer_ids"),
    ({"target_layer_ids": 3}, "target_layer_ids"),
    ({"mask_token_id": 50}, "mask_token_id"),
    ({"mask_token_id": "0"}, "mask_token_id"),
    ({"dflash_config": {"block_size": 1}}, "block_size"),
    ({"block_size": 10**9}, "block_size"),
    ({"max_position_embeddings": "4096"}, "max_position_embeddings"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_theta": "big"}, "rope_theta"),
    ({"rope_scaling": "yarn"}, "rope_scaling"),
    ({"attention_bias": "false"}, "attention_bias"),
    ({"dflash_config": [1]}, "dflash_config"),
    ({"architectures": "DFlashDraftModel"}, "architectures"),
    ({"layer_types": 3}, "layer_types"),
])
def test_hostile_configs_are_refused_in_one_line_naming_the_field(change, field):
    """Wrong types and ranges are refused before anything is computed or allocated from them: a string,
    a zero or a huge size used to surface as TypeError, ZeroDivisionError or an allocation."""
    cfg = {**OK, **change}
    with pytest.raises(UserError) as refused:
        DrafterConfig.from_dict(cfg, "drafter/config.json")
    message = str(refused.value)
    assert field in message and "\n" not in message and len(message) < 300, message
    assert message.startswith("drafter/config.json")


def test_the_config_checks_leave_real_configs_alone():
    config = DrafterConfig.from_dict({**OK, "head_dim": None, "num_key_value_heads": None,
                                      "final_logit_softcapping": 30})
    assert (config.head_dim, config.num_key_value_heads, config.final_logit_softcapping) == (8, 4, 30.0)
    assert DrafterConfig.from_dict({**OK, "num_target_layers": None}).num_target_layers == 8  # max id + 4


def test_a_config_that_is_not_an_object_is_refused(tmp_path):
    from dflash_edge.export.drafter import read_drafter_config

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_drafter_config(tmp_path)


def test_weight_files_that_hold_the_same_tensor_are_refused(tmp_path):
    """Loaded one after another, the later file's tensor would silently replace the earlier one's."""
    from safetensors.torch import load_file, save_file

    from dflash_edge.export.drafter import read_drafter_config

    config = DrafterConfig.from_dict(OK)
    save_drafter(random_drafter(config), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert read_drafter_config(tmp_path).hidden_size == 32
    # Split in two without overlap: still one drafter.
    names = sorted(state)
    (tmp_path / "model.safetensors").unlink()
    save_file({k: state[k] for k in names[:5]}, str(tmp_path / "model-00001.safetensors"))
    save_file({k: state[k] for k in names[5:]}, str(tmp_path / "model-00002.safetensors"))
    assert read_drafter_config(tmp_path).hidden_size == 32
    # A third file with another fc.weight (spelt with z-lab's optional prefix): refused, naming both files.
    save_file({"model.fc.weight": torch.zeros_like(state["fc.weight"])}, str(tmp_path / "zz-extra.safetensors"))
    with pytest.raises(UserError) as refused:
        read_drafter_config(tmp_path)
    message = str(refused.value)
    assert "fc.weight" in message and "zz-extra.safetensors" in message and "\n" not in message, message
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(UserError, match="cannot read"):
        read_drafter_config(tmp_path)
