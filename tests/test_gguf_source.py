"""GGUF tensors streamed one at a time equal transformers' load of the same file."""
import numpy as np
import pytest
import torch


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama's q/k rows (written here from its description)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_undoes_llama_cpps_permutation(heads):
    from dflash_edge.export.gguf_source import unpermute

    w = np.random.default_rng(0).standard_normal((heads * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute(llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(llama_cpp_permute(w, heads), w)


def test_names_map_to_hugging_faces():
    from dflash_edge.export.gguf_source import hf_name

    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert hf_name("blk.3.attn_q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    assert hf_name("blk.x.attn_q.weight") is None and hf_name("blk.0.unknown.weight") is None


@pytest.mark.smollm2
def test_every_smollm2_tensor_equals_transformers_load():
    """The embedded default (Q4_1 and Q8_0 blocks, permuted q/k): dequantized and un-permuted here, bit for
    bit what transformers holds after from_pretrained(gguf_file=...)."""
    from dflash_edge.export.gguf_source import GGUFSource
    from dflash_edge.export.sources import load_hf, read_hf, resolve_model

    source = resolve_model("smollm2-135m")
    config, _, family, _ = read_hf(source, lambda *a: None)
    weights = GGUFSource(source.path / source.gguf_file, config, family)
    hf, _, _ = load_hf(source, lambda *a: None)
    state = hf.state_dict()
    assert weights.names() == set(state) - {"lm_head.weight"}  # tied: the head is the embedding
    for name in sorted(weights.names()):
        tensor = weights.get(name)
        assert tensor.dtype == torch.float32 and weights.shape(name) == tuple(state[name].shape)
        assert torch.equal(tensor, state[name]), name


def test_an_unknown_gguf_tensor_is_refused_in_one_line(tmp_path):
    from types import SimpleNamespace

    import gguf

    from dflash_edge.errors import UserError
    from dflash_edge.export.gguf_source import GGUFSource

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("blk.0.ssm_conv1d.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = SimpleNamespace(num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(UserError, match="blk.0.ssm_conv1d.weight"):
        GGUFSource(path, config, "llama")
