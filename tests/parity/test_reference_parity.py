"""Parity with the reference DFlash implementation: the `dflash` 0.1.0 package (z-lab, MIT).

The reference pins transformers 5.15, so these tests run in their own environment: `bash scripts/parity.sh`.
Anywhere the reference package is absent (the project venv) the whole module is skipped.

Both sides load the same folders: a tiny random Qwen3 target saved with transformers, and a random drafter
saved by `save_drafter` in z-lab's checkpoint format.

- Drafter logits: our `DFlashDrafter` (PyTorch) vs `DFlashDraftModel` + `compute_logits`, with fresh context
  and with context projected in two steps (our runtime projects context incrementally; the reference keeps it
  in a DynamicCache cropped back after every block).
- The exported ONNX graphs: target logits and taps vs Hugging Face; drafter context K/V vs the reference's
  draft cache, and in-graph draft ids vs the argmax of the reference's logits.
- Greedy generation: our exported ONNX folder run by `dflash_edge.runtime.generate` vs `dflash_generate`:
  identical new tokens and identical tokens-per-round sequences, over several prompts, block sizes 2/4/8,
  max_new_tokens values whose last round verifies a shortened block, and stop tokens.
Everything runs for a target with its own LM head and for one tied to the embedding.

Random weights and an 8-token vocabulary make random drafts agree with the target often enough that rounds
accepting several drafts occur (asserted), so the acceptance bookkeeping is exercised, not only the bonus token.

Discrepancies found here were fixed; their tests stay at the end of the file as regressions.
"""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.parity

ref = pytest.importorskip("dflash.model", reason="the reference package dflash is not installed "
                                                 "(run bash scripts/parity.sh)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dflash_edge.export.drafter import (  # noqa: E402
    DFlashDrafter,
    config_for_target,
    load_drafter,
    random_drafter,
    save_drafter,
)

# Vocabulary: <unk>, <eos>, 5 words and the mask token, whose id is a real row of the embedding table as in
# z-lab configs. Eight tokens on purpose (see the module docstring). The weight scales and seeds were picked so
# that every block size sees rounds that accept several drafts, up to the whole block.
WORDS = ["the", "cat", "sat", "on", "mat", "<|mask|>"]
SPECIALS = ["<unk>", "<eos>"]
VOCAB = len(SPECIALS) + len(WORDS)
EOS = 1
MASK = VOCAB - 1
TAPS = [0, 1, 2]          # of 4 target layers; the last layer is not tapped (see test_last_layer_tap_matches_reference)
BLOCK = 8                 # the drafter's trained block size
RTOL = 1e-4               # max |ours - ref| / max |ref|, fp32
ROPE_THETA = 1e6          # Qwen3's; not transformers' default (10000), so a config key read by neither side shows

PROMPTS = [
    [2],
    [2, 3, 4],
    [5, 6, 7, 1, 0, 3],
    [3, 3, 3, 3],
    [4, 5, 6, 7, 2, 4, 6, 1, 0, 3, 2],
    [7, 0, 7, 7, 2],
]
MAX_NEW = [1, 2, 7, 19, 40]   # 1: prefill only; the others mostly end on a shortened last block


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models gain nothing from threads, and torch's OpenMP pool fighting ONNX Runtime's for two cores
    # made single 64-wide matmuls take milliseconds (a 30x slower suite).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _target_config(tied: bool):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=ROPE_THETA, tie_word_embeddings=tied, initializer_range=0.5,
        eos_token_id=EOS, bos_token_id=None, pad_token_id=None,
    )


def _save_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def folders(request, tmp_path_factory):
    """A saved tiny Qwen3 target (with tokenizer.json) and a saved random drafter for it.

    Both head layouts: an LM head of its own (Qwen3-8B) and one tied to the embedding (Qwen3-4B), which the
    exporter shares between graphs differently.
    """
    from transformers import Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(0)
    target = Qwen3ForCausalLM(_target_config(tied=request.param)).eval()
    assert (target.lm_head.weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()) == request.param
    target.save_pretrained(root / "target")
    _save_tokenizer(root / "target")
    cfg = config_for_target(target.config, num_layers=2, block_size=BLOCK, mask_token_id=MASK,
                            tap_layer_ids=TAPS)
    assert cfg.rope_theta == ROPE_THETA
    save_drafter(random_drafter(cfg, seed=2, std=0.3), root / "drafter", dtype=torch.float32)
    return root


@pytest.fixture(scope="module")
def ref_target(folders):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(folders / "target", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref_drafter(folders):
    model = ref.DFlashDraftModel.from_pretrained(folders / "drafter", dtype=torch.float32).eval()
    assert model.mask_token_id == MASK and list(model.target_layer_ids) == TAPS
    assert model.block_size == BLOCK
    assert model.config.rope_parameters["rope_theta"] == ROPE_THETA
    return model


@pytest.fixture(scope="module")
def our_drafter(folders, ref_target):
    model = load_drafter(folders / "drafter")
    model.attach_target(ref_target.get_input_embeddings().weight, ref_target.lm_head.weight)
    return model


@pytest.fixture(scope="module")
def features(ref_target):
    """Real tapped target features ([1, T, 3*H]) for a 9-token context, via the reference's extractor."""
    ids = torch.tensor([[2, 3, 4, 5, 6, 1, 0, 4, 3]])
    with torch.no_grad():
        out = ref_target(ids, output_hidden_states=True)
    return ref.extract_context_feature(out.hidden_states, TAPS)


# --------------------------------------------------------------------------------------- drafter logits

def _noise(ref_target, block_ids):
    return torch.nn.functional.embedding(block_ids, ref_target.get_input_embeddings().weight)


@pytest.mark.parametrize("block", [2, 4, BLOCK])
def test_drafter_logits_fresh_context(our_drafter, ref_drafter, ref_target, features, block):
    ctx = features.shape[1]
    block_ids = torch.tensor([[5] + [MASK] * (block - 1)])
    positions = torch.arange(ctx + block)[None]
    with torch.no_grad():
        ours = our_drafter(features, positions[:, :ctx], block_ids, positions[:, ctx:])
        hidden = ref_drafter(target_hidden=features, noise_embedding=_noise(ref_target, block_ids),
                             position_ids=positions, use_cache=False)
        theirs = ref_drafter.compute_logits(hidden, ref_target.lm_head)
    assert ours.shape == theirs.shape == (1, block, VOCAB)
    err = rel_err(ours, theirs)
    print(f"\nparity: drafter logits, fresh context {ctx}, block {block}: max rel err {err:.2e}")
    assert err < RTOL
    # Non-trivial outputs: logits spread over the vocabulary and differ between rows.
    assert theirs.std() > 0.1 and (theirs[0] - theirs[0, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("split", [1, 4, 8])
def test_drafter_logits_incremental_context(our_drafter, ref_drafter, ref_target, features, split):
    """Context projected in two chunks (ours) vs the reference's draft DynamicCache across two blocks."""
    ctx = features.shape[1]
    positions = torch.arange(ctx + BLOCK)[None]
    first_ids = torch.tensor([[4] + [MASK] * (BLOCK - 1)])    # block at positions split..
    second_ids = torch.tensor([[5] + [MASK] * (BLOCK - 1)])   # block at positions ctx..
    with torch.no_grad():
        # Reference, as dflash_generate drives it: block 1 over context [0, split), crop the cache back to
        # `split`, then block 2 over the new context [split, ctx) with the cached part.
        cache = ref._make_cache(ref_drafter.config)
        h1 = ref_drafter(target_hidden=features[:, :split], noise_embedding=_noise(ref_target, first_ids),
                         position_ids=positions[:, :split + BLOCK], past_key_values=cache, use_cache=True)
        ref._crop_to(cache, split)
        assert cache.get_seq_length() == split
        h2 = ref_drafter(target_hidden=features[:, split:], noise_embedding=_noise(ref_target, second_ids),
                         position_ids=positions[:, split:ctx + BLOCK], past_key_values=cache, use_cache=True)
        theirs1 = ref_drafter.compute_logits(h1, ref_target.lm_head)
        theirs2 = ref_drafter.compute_logits(h2, ref_target.lm_head)

        # Ours, as the runtime drives it: append-only context K/V, one projection per chunk.
        d = our_drafter
        first = d.context_kv(features[:, :split], positions[:, :split])
        ours1 = d.logits(d.block_hidden(d.embed(first_ids), positions[:, split:split + BLOCK], first))
        second = d.context_kv(features[:, split:], positions[:, split:ctx])
        context = [torch.cat([a, b], dim=2) for a, b in zip(first, second)]
        assert context[0].shape[2] == ctx
        ours2 = d.logits(d.block_hidden(d.embed(second_ids), positions[:, ctx:], context))
    e1, e2 = rel_err(ours1, theirs1), rel_err(ours2, theirs2)
    print(f"\nparity: drafter logits, context {split}+{ctx - split} in two chunks: "
          f"max rel err {e1:.2e} (block 1), {e2:.2e} (block 2)")
    assert e1 < RTOL and e2 < RTOL


# ------------------------------------------------------------------------------------ greedy generation

@pytest.fixture(scope="module")
def exported(folders):
    from dflash_edge.export.pipeline import export
    from dflash_edge.runtime.model import ExportedModel

    out = export(model=str(folders / "target"), output=str(folders / "export"),
                 drafter=str(folders / "drafter"), log=lambda *_: None)
    model = ExportedModel(out, threads=1)
    assert model.block_size == BLOCK
    return model


@pytest.fixture
def cpu_timer(monkeypatch):
    # dflash_generate(return_stats=True) times with torch.cuda.synchronize(), which a CPU torch refuses.
    monkeypatch.setattr(ref, "_cuda_time", time.perf_counter)


def run_ours(model, prompt, max_new, block, stops):
    from dflash_edge.runtime.generate import generate

    model.stop_token_ids = set(stops)
    calls = []
    ids, stats = generate(model, list(prompt), max_new, block, on_tokens=lambda t: calls.append(list(t)))
    # The first call carries the prefill token; each later call is one verify round.
    assert [t for c in calls for t in c] == ids
    rounds = [len(c) for c in calls[1:]]
    assert stats.rounds == len(rounds) and sum(stats.acceptance.values()) == len(rounds)
    return ids, rounds


def run_ref(drafter, target, prompt, max_new, block, stops):
    res = ref.dflash_generate(drafter, target, torch.tensor([prompt]), max_new, list(stops),
                              temperature=0.0, block_size=block, return_stats=True)
    out = res.output_ids[0].tolist()
    assert out[:len(prompt)] == list(prompt)
    return out[len(prompt):], list(res.acceptance_lengths)


def test_exported_target_matches_reference_target(exported, ref_target):
    """The ONNX target's logits and taps vs Hugging Face under transformers 5 (localises any failure below)."""
    import numpy as np

    prompt = PROMPTS[4]
    cache = exported.new_target_cache()
    step = exported.run_target(prompt, cache, last_only=False, logits=True, taps=True)
    logits, taps = step.logits, step.taps.numpy()[0]
    with torch.no_grad():
        out = ref_target(torch.tensor([prompt]), output_hidden_states=True)
    ref_taps = ref.extract_context_feature(out.hidden_states, TAPS)[0]
    e_logits = rel_err(torch.from_numpy(np.asarray(logits)), out.logits[0])
    e_taps = rel_err(torch.from_numpy(np.asarray(taps)), ref_taps)
    print(f"\nparity: ONNX target vs HF: logits rel err {e_logits:.2e}, taps rel err {e_taps:.2e}")
    assert e_logits < RTOL and e_taps < RTOL


@pytest.mark.parametrize("block", [2, 4, BLOCK])
def test_greedy_generation_matches_reference(exported, ref_drafter, ref_target, cpu_timer, block):
    compared = rounds_compared = multi = longest = 0
    for prompt in PROMPTS:
        for max_new in MAX_NEW:
            ours, our_rounds = run_ours(exported, prompt, max_new, block, stops=[])
            theirs, their_rounds = run_ref(ref_drafter, ref_target, prompt, max_new, block, stops=[])
            where = f"prompt {prompt}, max_new_tokens {max_new}, block {block}"
            assert ours == theirs, f"tokens differ ({where}): ours {ours}, reference {theirs}"
            assert our_rounds == their_rounds, \
                f"tokens per round differ ({where}): ours {our_rounds}, reference {their_rounds}"
            assert len(ours) == max_new
            compared += 1
            rounds_compared += len(our_rounds)
            multi += sum(r > 1 for r in our_rounds)
            longest = max([longest, *our_rounds])
    print(f"\nparity: block {block}: {compared} generations, {rounds_compared} rounds identical, "
          f"{multi} rounds committed >1 token (at most {longest})")
    assert multi > 0, "no round accepted a draft: the comparison never exercised acceptance"


@pytest.mark.parametrize("block", [2, BLOCK])
def test_stop_tokens_match_reference(exported, ref_drafter, ref_target, cpu_timer, block):
    """A stop token that occurs mid-block ends both at the same place; so does one at the very first token."""
    checked = 0
    for prompt in PROMPTS:
        free, _ = run_ref(ref_drafter, ref_target, prompt, 40, block, stops=[])
        absent = [t for t in range(VOCAB) if t not in free][:1]  # a stop id that never comes, when there is one
        for stop in sorted({free[0], *free[3:8]}):
            stops = [stop, *absent]
            ours, our_rounds = run_ours(exported, prompt, 40, block, stops)
            theirs, their_rounds = run_ref(ref_drafter, ref_target, prompt, 40, block, stops)
            where = f"prompt {prompt}, stop {stop}, block {block}"
            assert ours == theirs, f"tokens differ ({where}): ours {ours}, reference {theirs}"
            assert our_rounds == their_rounds, f"rounds differ ({where}): {our_rounds} vs {their_rounds}"
            assert ours[-1] == stop and stop not in ours[:-1]
            checked += 1
    print(f"\nparity: stop tokens, block {block}: {checked} generations identical")


def test_exported_stop_ids_are_the_eos(exported):
    assert exported.manifest["stop_token_ids"] == [EOS]


def test_exported_drafter_matches_reference(exported, ref_drafter, ref_target, features):
    """The ONNX drafter graphs directly: context K/V projected in two chunks vs the reference's draft cache,
    and the in-graph argmax drafts vs the argmax of the reference's logits."""
    import numpy as np
    import onnxruntime as ort

    taps = features.numpy()
    ctx = taps.shape[1]
    cache = exported.new_draft_cache()
    exported.project_context([(ort.OrtValue.ortvalue_from_numpy(taps[:, :4].copy()), 4)], cache)
    exported.project_context([(ort.OrtValue.ortvalue_from_numpy(taps[:, 4:].copy()), ctx - 4)], cache)
    compared = 0
    for block in (2, 4, BLOCK):
        block_ids = torch.tensor([[5] + [MASK] * (block - 1)])
        ref_cache = ref._make_cache(ref_drafter.config)
        with torch.no_grad():
            hidden = ref_drafter(target_hidden=features, noise_embedding=_noise(ref_target, block_ids),
                                 position_ids=torch.arange(ctx + block)[None], past_key_values=ref_cache,
                                 use_cache=True)
            logits = ref_drafter.compute_logits(hidden, ref_target.lm_head)[0, 1:]
        ref._crop_to(ref_cache, ctx)
        for i, layer in enumerate(ref_cache.layers):
            keys, values = cache.layer(i)
            assert rel_err(torch.from_numpy(np.ascontiguousarray(keys)), layer.keys) < RTOL
            assert rel_err(torch.from_numpy(np.ascontiguousarray(values)), layer.values) < RTOL
        drafts = exported.draft(5, ctx, block, cache)
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4   # skip near-ties, where fp32 rounding may pick either
        expected = logits.argmax(-1)
        assert [d for d, c in zip(drafts, clear) if c] == expected[clear].tolist()
        compared += int(clear.sum())
    print(f"\nparity: ONNX drafter: context K/V of 2 layers match, {compared} draft positions identical")
    assert compared >= 10


# ------------------------------------------------------------------------------------ found and fixed
# Each of these was a discrepancy this suite found; they stay as regression tests.

def test_drafter_saved_by_reference_under_transformers5(tmp_path, folders):
    """A drafter checkpoint written by the reference (DFlashDraftModel.save_pretrained, transformers 5) with a
    non-default rope theta loads in dflash-edge with the reference's rotary frequencies."""
    from transformers import Qwen3Config

    config = Qwen3Config.from_pretrained(folders / "drafter")
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    model = ref.DFlashDraftModel.from_pretrained(folders / "drafter", config=config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    written = (tmp_path / "config.json").read_text()
    assert '"rope_parameters"' in written and '"rope_theta": 500000.0' in written
    ours = load_drafter(tmp_path)
    reloaded = ref.DFlashDraftModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert rel_err(ours.rotary.inv_freq, reloaded.rotary_emb.inv_freq) < 1e-6


def test_config_for_target_copies_rope_theta_under_transformers5():
    from transformers import Qwen3ForCausalLM

    target = Qwen3ForCausalLM(_target_config(tied=False))
    assert target.config.rope_parameters["rope_theta"] == ROPE_THETA
    drafter = DFlashDrafter(config_for_target(target.config, mask_token_id=MASK, tap_layer_ids=TAPS))
    assert rel_err(drafter.rotary.inv_freq, target.model.rotary_emb.inv_freq) < 1e-6


def test_last_layer_tap_matches_reference(ref_target):
    from dflash_edge.export.modeling import load_target_from_hf

    last = ref_target.config.num_hidden_layers - 1
    ids = torch.tensor([[2, 3, 4, 5]])
    target = load_target_from_hf(ref_target, [last], qk_norm=True)
    with torch.no_grad():
        _, aux, *_ = target(ids, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long), torch.arange(4),
                            *target.empty_cache(1))
        hidden = ref_target(ids, output_hidden_states=True).hidden_states
    assert rel_err(aux, ref.extract_context_feature(hidden, [last])) < RTOL


# ------------------------------------------------------------------------------- trained checkpoints

def _shipped_drafters():
    from dflash_edge.export.sources import SHIPPED_DRAFTERS

    return [p for p in SHIPPED_DRAFTERS.values() if (p / "config.json").is_file()]


@pytest.mark.parametrize("folder", _shipped_drafters(), ids=lambda p: p.name)
def test_shipped_drafter_loads_unchanged_in_the_reference(folder):
    """The drafter dflash-train wrote (bf16 safetensors, z-lab config) loads in the reference package with every
    weight used and none missing, and both implementations compute the same draft logits from it."""
    model, info = ref.DFlashDraftModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = load_drafter(folder)
    cfg = ours.config
    assert list(model.target_layer_ids) == cfg.target_layer_ids and model.block_size == cfg.block_size
    assert model.mask_token_id == cfg.mask_token_id
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.05
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    head.weight.data = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.05
    ours.attach_target(embed, head.weight)
    ctx = 12
    features = torch.randn(1, ctx, len(cfg.target_layer_ids) * cfg.hidden_size, generator=g) * 3
    block_ids = torch.tensor([[17] + [cfg.mask_token_id] * (cfg.block_size - 1)])
    positions = torch.arange(ctx + cfg.block_size)[None]
    with torch.no_grad():
        mine = ours.float()(features, positions[:, :ctx], block_ids, positions[:, ctx:])
        hidden = model(target_hidden=features, noise_embedding=torch.nn.functional.embedding(block_ids, embed),
                       position_ids=positions, use_cache=False)
        theirs = model.compute_logits(hidden, head)
    err = rel_err(mine, theirs)
    print(f"\nparity: shipped drafter {folder.name}: max rel err {err:.2e}")
    assert err < RTOL
