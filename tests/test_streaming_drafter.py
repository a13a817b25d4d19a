"""The drafter exported without holding its weights: the same two graphs as the traced export, its first
layer validated when it is too big to validate whole, and its checkpoint checked against its config."""
import json

import numpy as np
import onnx
import pytest
import torch

from dflash_edge.bench.synthetic import save_random_drafter, save_target


def _run(folder, manifest_drafter, shared, config, dtype):
    """Context graph then block graph on fixed inputs; every output."""
    from dflash_edge.export.drafter import DFlashDrafter
    from dflash_edge.runtime.session import SharedWeights, make_session

    weights = SharedWeights(folder, shared)
    context = make_session(folder / "drafter_context.onnx", ["CPUExecutionProvider"], weights)
    block = make_session(folder / "drafter_block.onnx", ["CPUExecutionProvider"], weights)
    rng = np.random.default_rng(0)
    np_dtype = np.float32 if dtype == torch.float32 else np.float16
    with torch.device("meta"):
        shapes = DFlashDrafter(config).cache_shapes(24)
    feeds = {"target_hidden": rng.standard_normal((1, 5, len(config.target_layer_ids) * config.hidden_size),
                                                  dtype=np.float32) * 4,
             "position_ids": np.arange(5)[None]}
    feeds.update(zip(manifest_drafter["context"]["inputs"][2:], [rng.standard_normal(s).astype(np_dtype) for s in shapes]))
    cache = context.run(None, feeds)
    feeds = {"input_ids": np.array([[5] + [config.mask_token_id] * 15]), "position_ids": np.arange(5, 21)[None]}
    feeds.update(zip(manifest_drafter["block"]["inputs"][2:], cache))
    return cache + block.run(None, feeds)


@pytest.mark.parametrize("arch,dtype,reduced", [("llama", torch.float32, False), ("qwen3", torch.float16, False),
                                                ("qwen3", torch.float32, True)])
def test_streamed_drafter_equals_the_traced_one(arch, dtype, reduced, tmp_path):
    """Same outputs bit for bit: tied (Llama) and untied (Qwen3) heads, an fp16 drafter whose fc the graph
    runs in fp32 (a Cast folded into the written weight), and a reduced draft vocabulary (rows of the head)."""
    from transformers import AutoModelForCausalLM

    from dflash_edge.export import trace
    from dflash_edge.export.drafter import load_drafter, read_drafter_config
    from dflash_edge.export.shared import share_weights
    from dflash_edge.export.streaming import SafetensorsSource
    from dflash_edge.export.streaming_drafter import DrafterWeights, export_drafter_streamed

    target = save_target(tmp_path / "hf", arch)
    folder = save_random_drafter(tmp_path / "drafter", target, layers=2, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tied = hf.config.tie_word_embeddings
    ids = list(range(0, hf.config.vocab_size, 3)) if reduced else None
    names = ["embed_tokens.weight"] + ([] if tied or reduced else ["lm_head.weight"])
    config = read_drafter_config(folder)
    (tmp_path / "traced").mkdir()
    (tmp_path / "streamed").mkdir()
    trace.export_drafter(load_drafter(folder).to(dtype), hf.model.embed_tokens.weight.to(dtype),
                         hf.lm_head.weight.to(dtype), tied, tmp_path / "traced" / "drafter_context.onnx",
                         tmp_path / "traced" / "drafter_block.onnx", ids)
    seen = []
    io = export_drafter_streamed(config, DrafterWeights(SafetensorsSource(folder), SafetensorsSource(target), tied),
                                 dtype, tmp_path / "streamed", ids, lambda done, total: seen.append((done, total)))
    assert io == trace.drafter_io_names(config.num_hidden_layers)
    assert seen[-1][0] == seen[-1][1] and len(seen) == seen[-1][1]
    outputs = {k: _run(tmp_path / k, io, share_weights(tmp_path / k, ["drafter_block.onnx"], names), config, dtype)
               for k in ("traced", "streamed")}
    assert len(outputs["streamed"]) == 2 * config.num_hidden_layers + 1
    for a, b in zip(outputs["traced"], outputs["streamed"]):
        assert np.array_equal(a, b)
    # The vocabulary matrices went straight to the shared file, not into the block graph's own.
    graph = onnx.load(str(tmp_path / "streamed" / "drafter_block.onnx"), load_external_data=False).graph
    where = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in graph.initializer}
    assert {n: where[n] for n in names} == {n: "shared_weights.data" for n in names}


def test_a_drafter_whose_weights_disagree_with_its_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from dflash_edge.errors import UserError
    from dflash_edge.export.pipeline import export

    target = save_target(tmp_path / "hf", "llama")
    folder = save_random_drafter(tmp_path / "drafter", target)
    state = load_file(str(folder / "model.safetensors"))
    state["layers.0.mlp.up_proj.weight"] = state["layers.0.mlp.up_proj.weight"][:-1].contiguous()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"layers\.0\.mlp\.up_proj\.weight has shape"):
        export(str(target), str(tmp_path / "out"), drafter=str(folder), log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def _export_checked_by_layer(target, folder, out, monkeypatch, **kwargs):
    from dflash_edge.export import pipeline

    monkeypatch.setattr(pipeline, "FULL_VALIDATION_MAX_PARAMS", 1000)  # the tiny drafter takes the big path
    return pipeline.export(str(target), str(out), drafter=str(folder), log=lambda *a: None, **kwargs)


def test_a_large_drafter_is_validated_on_its_first_layer_and_runs(tmp_path, monkeypatch):
    from dflash_edge.runtime.model import ExportedModel

    target = save_target(tmp_path / "hf", "qwen3")
    folder = save_random_drafter(tmp_path / "drafter", target, layers=2, dtype=torch.bfloat16)
    out = _export_checked_by_layer(target, folder, tmp_path / "out", monkeypatch)
    checks = json.loads((out / "dflash_edge.json").read_text())["export"]["validation"]
    layer = [k for k in checks if k.startswith("drafter_block (layer 0")]
    assert layer and all(checks[k]["ok"] for k in layer)
    assert any(k.endswith(":draft_logits") for k in layer)  # its logits compared as numbers, not only argmaxes
    assert checks["drafter_block:external data"]["ok"] and checks["drafter_context:onnx checker"]["ok"]
    model = ExportedModel(out)
    assert model.drafter_info["num_layers"] == 2


def test_the_first_layer_check_catches_drafter_weights_in_the_wrong_place(tmp_path, monkeypatch):
    """Swap two projections of layer 0 in the plan from graph to checkpoint: the check fills its reference
    module by parameter name, not through that plan, so it must fail."""
    from dflash_edge.export import streaming_drafter
    from dflash_edge.export.pipeline import ValidationFailed
    from dflash_edge.export.streaming import Planned

    target = save_target(tmp_path / "hf", "llama")
    folder = save_random_drafter(tmp_path / "drafter", target, layers=2)
    right = streaming_drafter.skeletons

    def swapped(*args, **kwargs):
        context, block, plans = right(*args, **kwargs)
        up, gate = "drafter.layers.0.mlp.up_proj.weight", "drafter.layers.0.mlp.gate_proj.weight"
        plans[up], plans[gate] = Planned(plans[gate].source), Planned(plans[up].source)
        return context, block, plans

    monkeypatch.setattr(streaming_drafter, "skeletons", swapped)
    with pytest.raises(ValidationFailed):
        _export_checked_by_layer(target, folder, tmp_path / "out", monkeypatch)
    assert not (tmp_path / "out").exists()


def test_an_8b_export_with_a_z_lab_sized_drafter_fits_the_budget():
    """Llama-3.1-8B with a 5-layer drafter of its width (about 1.1 B parameters, like z-lab's)."""
    import math
    from types import SimpleNamespace

    from dflash_edge.bench.synthetic import LLAMA31_8B
    from dflash_edge.export.budget import Shape, estimate
    from dflash_edge.export.drafter import config_for_target, drafter_parameter_shapes

    config = SimpleNamespace(**LLAMA31_8B, tie_word_embeddings=False, rms_norm_eps=1e-5)
    config.to_dict = lambda: dict(LLAMA31_8B, rope_theta=500000.0)
    shapes = drafter_parameter_shapes(config_for_target(config, num_layers=5))
    params = sum(math.prod(s) for s in shapes.values())
    first = sum(math.prod(s) for n, s in shapes.items() if not n.startswith("layers.") or n.startswith("layers.0."))
    assert 1.0e9 < params < 1.3e9
    need = estimate(Shape.of(config), "fp32", "int4", streamed=True, validate_layers=2, drafter_params=params,
                    drafter_checked=first)
    assert need.memory < 8e9
    whole = estimate(Shape.of(config), "fp32", "int4", streamed=True, validate_layers=2, drafter_params=params,
                     drafter_checked=params)
    assert whole.memory > 12e9 and "drafter" in whole.how
