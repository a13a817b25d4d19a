"""dflash-train: the objective's three classic bugs pinned, clean data, and a tiny end-to-end run."""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dflash_edge.export.drafter import DrafterConfig, random_drafter
from dflash_edge.train.objective import block_mask_bias, dflash_loss, loss_weights, sample_anchors, target_labels


def test_block_sees_context_strictly_before_its_anchor_and_its_own_block_only():
    anchors = torch.tensor([2, 5])
    bias = block_mask_bias(anchors, seq_len=8, block=3)[0, 0] == 0  # True = visible
    ctx, blk = bias[:, :8], bias[:, 8:]
    assert ctx[0].tolist() == [True, True, False, False, False, False, False, False]  # < 2, not <= 2
    assert ctx[3].tolist() == [True] * 5 + [False] * 3
    assert blk[1].tolist() == [True, True, True, False, False, False]   # its block, both directions
    assert blk[4].tolist() == [False, False, False, True, True, True]


def test_anchor_row_has_no_weight_and_decay_starts_at_row_one():
    w = loss_weights(4, gamma=7.0)
    assert w[0] == 0 and w[1] == 1.0
    assert torch.allclose(w[2:], torch.exp(-torch.tensor([1.0, 2.0]) / 7.0))


def test_labels_are_not_shifted():
    """A drafter whose head always answers the token at the row's own position scores zero loss."""
    cfg = DrafterConfig.from_dict({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                                   "vocab_size": 12, "mask_token_id": 11, "target_layer_ids": [0],
                                   "block_size": 4})
    drafter = random_drafter(cfg)
    tokens = torch.arange(10)  # token at position p is p
    # Row k of a block sits at position p + k; this stand-in predicts exactly the token at its position.
    drafter.block_hidden = lambda embeds, positions, context, bias=None, fused=False: torch.nn.functional.one_hot(
        positions, 16).float()
    drafter.attach_target(torch.randn(12, 16), torch.eye(16)[:12] * 50)
    loss, info = dflash_loss(drafter, torch.randn(10, 16), tokens, torch.ones(10), torch.tensor([1, 4]), 7.0)
    assert loss.item() < 1e-3  # so the labels sit at p + k: no shift
    assert info["accept"] == cfg.block_size


def test_target_labels_follow_the_target_until_the_text_departs_from_it():
    # The target would continue 0 -> 1 -> 2 -> ... (its choice after token t is t + 1); the text agrees
    # up to position 3 and then writes 9 where the target would have written 4.
    tokens = torch.tensor([0, 1, 2, 3, 9, 10, 11, 12])
    greedy = tokens + 1
    labels, on_path = target_labels(tokens, greedy, torch.tensor([1, 2, 3, 4, 5]), block=5)
    # Row k at position 1 + k learns the target's choice after the token before it, not the text's token...
    assert labels.tolist() == [[1, 2, 3, 4, 10]]
    # ...and only while the rows before it were the target's choices: row 4 (position 5) follows the 9
    # the target would never have written, so what the target puts there is unknown.
    assert on_path.tolist() == [[True, True, True, True, False]]


def _small_drafter(vocab=40):
    cfg = DrafterConfig.from_dict({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                                   "vocab_size": vocab, "mask_token_id": vocab - 1, "target_layer_ids": [0, 1],
                                   "block_size": 4})
    drafter = random_drafter(cfg, std=0.3)
    g = torch.Generator().manual_seed(0)
    drafter.attach_target(torch.randn(vocab, 16, generator=g), torch.randn(vocab, 16, generator=g))
    return drafter


def test_sampled_negatives_estimate_the_full_vocabulary_softmax():
    """With every token outside the draft vocabulary sampled once, the loss is the full-vocabulary loss."""
    drafter = _small_drafter()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 10, (12,), generator=g)           # labels all inside the subset 0..19
    features, mask, anchors = torch.randn(12, 32, generator=g), torch.ones(12), torch.tensor([2, 6])
    full, _ = dflash_loss(drafter, features, tokens, mask, anchors, 4.0)
    subset = torch.arange(20)
    reduced, _ = dflash_loss(drafter, features, tokens, mask, anchors, 4.0, subset)
    exact, _ = dflash_loss(drafter, features, tokens, mask, anchors, 4.0, subset, torch.arange(20, 40), 1.0)
    assert reduced < full - 1e-3           # without negatives the outside tokens are simply ignored
    assert torch.allclose(exact, full, atol=1e-5)
    half, _ = dflash_loss(drafter, features, tokens, mask, anchors, 4.0, subset, torch.arange(20, 40, 2), 2.0)
    assert abs(half.item() - full.item()) < abs(reduced.item() - full.item())


def test_rows_that_weigh_almost_nothing_skip_the_head():
    """gamma 0.5 at block 4: rows 1..3 weigh 1, 0.14, 0.02; a cut at 0.05 drops row 3 and barely moves
    the loss, which is the weighted mean over the rows that remain."""
    drafter = _small_drafter()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 39, (12,), generator=g)
    features, mask, anchors = torch.randn(12, 32, generator=g), torch.ones(12), torch.tensor([2, 6])
    full, info = dflash_loss(drafter, features, tokens, mask, anchors, 0.5)
    cut, info_cut = dflash_loss(drafter, features, tokens, mask, anchors, 0.5, min_weight=0.05)
    assert (info["rows"], info_cut["rows"]) == (6, 4)
    assert cut.item() != full.item() and abs(cut.item() - full.item()) < 0.05 * full.item()


def test_feature_scale_folds_into_fc():
    """A drafter trained on features * s, with s folded into fc, gives the same drafts on raw features."""
    from dflash_edge.train.trainer import fold_feature_scale

    drafter = _small_drafter()
    raw = torch.randn(1, 9, 32) * torch.logspace(-1, 3, 32)    # channels three orders of magnitude apart
    scale = 1 / raw[0].pow(2).mean(0).sqrt()
    pos, block_ids = torch.arange(13)[None], torch.tensor([[3, 39, 39, 39]])
    with torch.no_grad():
        trained_view = drafter(raw * scale, pos[:, :9], block_ids, pos[:, 9:])
        fold_feature_scale(drafter, scale)
        folded = drafter(raw, pos[:, :9], block_ids, pos[:, 9:])
    assert torch.allclose(folded, trained_view, rtol=1e-4, atol=1e-4)


class _MemoryStore:
    """The part of a FeatureStore that train() reads, held in memory."""

    def __init__(self, features, greedy=None):
        self.features, self.choices = features, greedy

    def __getitem__(self, i):
        return self.features[i]

    @property
    def has_greedy(self):
        return self.choices is not None

    def greedy(self, i):
        return self.choices[i]


def _training_set(count=24, length=14, width=32, vocab=39, seed=0):
    """Random sequences (a 3-token prompt, then a supervised reply) and features whose channels lie three
    orders of magnitude apart, as SmolLM2's taps do."""
    from dflash_edge.train.data import Sequence

    g = torch.Generator().manual_seed(seed)
    seqs = [Sequence(torch.randint(0, vocab, (length,), generator=g).tolist(), [0] * 3 + [1] * (length - 3))
            for _ in range(count)]
    spread = torch.logspace(-1, 3, width)
    return seqs, [torch.randn(length, width, generator=g) * spread for _ in seqs]


def _run(tmp_path, name, store, seqs, **kwargs):
    from dflash_edge.train.trainer import TrainConfig, train

    drafter = _small_drafter()
    cfg = TrainConfig(steps=3, batch=2, anchors=4, gamma=4.0, lr=1e-2, eval_every=1, save_every=100,
                      negatives=kwargs.pop("negatives", 0))
    (tmp_path / name).mkdir()
    result = train(drafter, store, seqs, tmp_path / name, cfg, log=lambda *a: None, **kwargs)
    return drafter, result, cfg


def test_the_trainer_trains_and_evaluates_on_scaled_features(tmp_path):
    """Trap 1 inside the trainer: train(feature_scale=s) on taps x must be exactly train() on taps x * s,
    in its steps (the weights) and in its held-out evaluations (the history)."""
    seqs, raw = _training_set()
    scale = 1 / torch.cat(raw).pow(2).mean(0).sqrt()
    assert scale.max() / scale.min() > 100
    scaled_inside, got, _ = _run(tmp_path, "a", _MemoryStore(raw), seqs, feature_scale=scale)
    scaled_before, want, _ = _run(tmp_path, "b", _MemoryStore([f * scale for f in raw]), seqs)
    assert got["history"] == want["history"]
    mine, theirs = scaled_inside.state_dict(), scaled_before.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # Without the scale the run is a different one, so the comparison above can fail.
    unscaled, other, _ = _run(tmp_path, "c", _MemoryStore(raw), seqs)
    assert other["history"][0]["loss"] != got["history"][0]["loss"]
    assert not torch.equal(unscaled.fc.weight, scaled_inside.fc.weight)


def test_held_out_evaluation_scores_the_full_vocabulary_whatever_training_uses(tmp_path):
    """Trap 2 inside the trainer: with a reduced draft vocabulary (and sampled negatives) the held-out
    metrics are still over the target's whole head, as at inference: they equal the metrics of a run
    without a draft vocabulary before training, and evaluate() with the full head after it."""
    from dflash_edge.train.trainer import evaluate, held_out_split

    seqs, features = _training_set()
    store = _MemoryStore(features)
    subset = torch.arange(0, 20)
    reduced, got, cfg = _run(tmp_path, "a", store, seqs, vocab_subset=subset, negatives=8)
    _, full, _ = _run(tmp_path, "b", store, seqs)
    assert got["history"][0] == full["history"][0]
    eval_ids, _ = held_out_split(len(seqs), cfg)
    after = evaluate(reduced, store, seqs, eval_ids, cfg)
    assert (got["loss"], got["tau_estimate"]) == (after["loss"], after["tau_estimate"])
    # Half the held-out labels lie outside the subset: an evaluation over it alone would score otherwise.
    i = eval_ids[0]
    anchors = torch.tensor([3, 6])
    args = (reduced, store[i], torch.tensor(seqs[i].tokens), torch.tensor(seqs[i].loss_mask), anchors, cfg.gamma)
    with torch.no_grad():
        assert abs(dflash_loss(*args)[0].item() - dflash_loss(*args, subset)[0].item()) > 0.1


def test_anchors_stay_inside_supervised_positions():
    mask = torch.tensor([0] * 5 + [1] * 20)
    a = sample_anchors(mask, block=4, count=100, generator=torch.Generator().manual_seed(0))
    assert a.min() >= 5 and a.max() <= 25 - 4 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == len(a)


def _evaluation_overlap(prompts: list[str]) -> list[str]:
    """What of HumanEval and MT-Bench appears in `prompts`, compared word by word (case and punctuation
    ignored): any line of 20+ characters of any HumanEval docstring, any MT-Bench turn (first or second),
    and any distinctive HumanEval function name (one with an underscore, or of 8+ letters) named as code:
    called, or, with an underscore, anywhere."""
    import re

    from dflash_edge.evalsets import load_prompts
    from dflash_edge.train.decontaminate import words

    def flat(text):
        return " ".join(words(text))

    # Padded with spaces and one prompt per line, so that a match is whole words of a single prompt.
    text = "\n".join(f" {flat(p)} " for p in prompts)
    humaneval = load_prompts("humaneval")
    lines = {flat(line) for prompt in humaneval for quote in ('"""', "'''")
             for doc in prompt.split(quote)[1::2] for line in doc.splitlines()}
    found = [line for line in lines if len(line) >= 20 and f" {line} " in text]
    found += [turn for turn in load_prompts("mtbench", all_turns=True) if f" {flat(turn)} " in text]
    names = {p.split("def ")[-1].split("(")[0].lower() for p in humaneval}
    distinctive = {n for n in names if "_" in n or len(n) >= 8}
    for prompt in map(str.lower, prompts):
        code = set(re.findall(r"[a-z0-9]*_[a-z0-9_]*", prompt)) | set(re.findall(r"([a-z_][a-z0-9_]*)\(", prompt))
        found += [f"{name} in {prompt[:80]!r}" for name in code & distinctive]
    return found


def test_training_prompts_never_contain_evaluation_prompts():
    from dflash_edge.train.prompts import build

    assert _evaluation_overlap(build(code=3000, chat=1000, tasks=2000)) == []


def test_the_shipped_prompts_and_replies_never_contain_evaluation_prompts():
    """The prompt files in the repository, and every reply in its shards, which must answer one of them."""
    import numpy as np

    from dflash_edge.train.data import read_prompts
    from dflash_edge.train.shards import conversation_id, read_manifest

    data = Path(__file__).resolve().parent.parent / "data" / "smollm2-135m"
    files = sorted((data / "prompts").glob("*.jsonl"))
    assert files
    conversations = [c for f in files for c in read_prompts(f)]
    assert _evaluation_overlap([turn["content"] for c in conversations for turn in c]) == []
    known = {conversation_id(c) for c in conversations}
    manifest = read_manifest(data / "shards")
    answered = 0
    for entry in manifest["shards"]:
        # Read-only and without the checksum: a regeneration run may be appending to the open shard, which
        # it renames into place before it updates that shard's checksum in the manifest.
        with np.load(data / "shards" / entry["file"], allow_pickle=False) as shard:
            ids = {int(i) for i in shard["prompt_ids"]}
        assert ids <= known, f"{entry['file']} answers prompts that are not in {data / 'prompts'}"
        answered += len(ids)
    assert answered > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    from dflash_edge.bench.synthetic import WORDS

    root = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))}) + "\n")
    cmd = [sys.executable, "-m", "dflash_edge.train.cli", "--target", str(tiny_llama[0]), "--data",
           str(root / "prompts.jsonl"), "--output", str(root / "drafter"), "--max-new-tokens", "40",
           "--steps", "60", "--anchors", "16", "--batch", "1", "--block-size", "8", "--mask-token-id", "3",
           "--lr", "3e-3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    # A later test resumes this work folder; the trained module as the checkpoint was made from stays here.
    shutil.copy(root / "drafter.work" / "state.pt", root / "state-at-60.pt")
    return root, out.stdout


def test_tiny_training_lowers_the_loss_and_beats_an_untrained_drafter(trained, tiny_llama):
    from dflash_edge.export.pipeline import export
    from dflash_edge.runtime.api import DFlashModel
    from dflash_edge.bench.synthetic import save_random_drafter

    root, log = trained
    report = json.loads((root / "drafter" / "training_report.json").read_text())
    assert report["sequences"] == 40 and report["steps"] == 60
    history = report["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 60
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history
    untrained = save_random_drafter(root / "untrained", tiny_llama[0], block_size=8)
    taus = {}
    for name, drafter in (("trained", root / "drafter"), ("untrained", untrained)):
        out = export(str(tiny_llama[0]), str(root / f"onnx-{name}"), drafter=str(drafter), log=lambda *a: None)
        model = DFlashModel(out)
        runs = [model.generate(p, 40, block_size=8) for p in ("hello world", "the cat sat", "def sort list")]
        taus[name] = sum(r.stats.tau for r in runs) / len(runs)
    assert taus["trained"] > taus["untrained"] + 0.3, taus


def test_dflash_train_trains_on_scaled_taps_and_folds_the_scale_into_the_checkpoint(trained, tiny_llama):
    """Trap 1 through dflash-train: the module trains on taps scaled to unit RMS per channel (its recorded
    held-out loss is the one on scaled taps), and the checkpoint is that module with the scale folded into
    fc, so that it takes raw taps."""
    from transformers import AutoModelForCausalLM

    from dflash_edge.export.drafter import load_drafter
    from dflash_edge.train.data import load_sequences
    from dflash_edge.train.features import FeatureStore
    from dflash_edge.train.objective import default_gamma
    from dflash_edge.train.trainer import TrainConfig, evaluate, feature_scale, held_out_split

    root, _ = trained
    work = root / "drafter.work"
    store, seqs = FeatureStore(work), load_sequences(work / "sequences.jsonl")
    scale = feature_scale(store)
    assert scale.max() / scale.min() > 3, scale  # the channels differ, so scaling changes what fc sees
    trained_module = torch.load(root / "state-at-60.pt", weights_only=True)["model"]
    saved = load_drafter(root / "drafter")
    for name, weight in saved.state_dict().items():
        want = trained_module[name] * scale[None, :] if name == "fc.weight" else trained_module[name]
        folded_as_trained = torch.equal(weight, want.to(torch.bfloat16).float())
        assert folded_as_trained, name
    # The module's last held-out loss in the training report is its loss on scaled taps, not on raw ones.
    module = load_drafter(root / "drafter")
    module.load_state_dict(trained_module)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama[0], dtype=torch.float32)
    module.attach_target(hf.get_input_embeddings().weight.detach(), hf.get_output_embeddings().weight.detach())
    cfg = TrainConfig(anchors=16, gamma=default_gamma(8))  # the fixture's --anchors and --block-size
    eval_ids, _ = held_out_split(len(seqs), cfg)
    recorded = json.loads((root / "drafter" / "training_report.json").read_text())["final"]["loss"]
    on_scaled = evaluate(module, store, seqs, eval_ids, cfg, scale)["loss"]
    on_raw = evaluate(module, store, seqs, eval_ids, cfg)["loss"]
    assert abs(on_scaled - recorded) < 1e-5 * recorded, (on_scaled, recorded)
    assert abs(on_raw - recorded) > 1e-4 * recorded, (on_raw, recorded)


def test_cached_target_choices_are_the_replies_the_target_generated(trained):
    from dflash_edge.train.data import load_sequences
    from dflash_edge.train.features import FeatureStore

    root, _ = trained
    work = root / "drafter.work"
    seqs, store = load_sequences(work / "sequences.jsonl"), FeatureStore(work)
    agree = total = 0
    for i, s in enumerate(seqs):
        tokens, greedy, mask = torch.tensor(s.tokens), store.greedy(i), torch.tensor(s.loss_mask).bool()
        # Inside a greedy reply, the target's choice after each token is the reply's next token.
        follows = mask[1:]
        agree += int((greedy[:-1][follows] == tokens[1:][follows]).sum())
        total += int(follows.sum())
    assert total > 0 and agree / total > 0.97, (agree, total)


def test_training_on_target_labels_runs_from_the_cached_features(trained, tiny_llama, tmp_path):
    root, _ = trained
    work = tmp_path / "work"
    work.mkdir()
    for name in ("sequences.jsonl", "features.json", "features.f16", "greedy.i32"):
        (work / name).hardlink_to(root / "drafter.work" / name)
    cmd = [sys.executable, "-m", "dflash_edge.train.cli", "--target", str(tiny_llama[0]), "--data",
           str(root / "prompts.jsonl"), "--output", str(tmp_path / "drafter"), "--work", str(work),
           "--steps", "20", "--anchors", "16", "--batch", "1", "--block-size", "8", "--mask-token-id", "3",
           "--lr", "3e-3", "--labels", "target", "--eval-every", "20"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cached features" in out.stdout
    history = json.loads((tmp_path / "drafter" / "training_report.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]


def test_training_resumes_from_its_state(trained, tiny_llama):
    root, _ = trained
    cmd = [sys.executable, "-m", "dflash_edge.train.cli", "--target", str(tiny_llama[0]), "--data",
           str(root / "prompts.jsonl"), "--output", str(root / "drafter2"), "--work", str(root / "drafter.work"),
           "--steps", "70", "--anchors", "16", "--batch", "1", "--block-size", "8", "--mask-token-id", "3",
           "--draft-vocab", "20", "--max-new-tokens", "40"]  # the cache's inputs, so it serves again
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cached sequences" in out.stdout and "cached features" in out.stdout
    assert "resumed at step 60" in out.stdout
    # The draft vocabulary it trained on ships beside the checkpoint, most frequent label first.
    from dflash_edge.export.drafter import read_draft_vocab
    from dflash_edge.train.data import label_counts, load_sequences

    ranked = read_draft_vocab(root / "drafter2", 10**6)
    counts = label_counts(load_sequences(root / "drafter.work" / "sequences.jsonl"), 10**6)
    assert len(ranked) == 20 and all(counts[a] >= counts[b] for a, b in zip(ranked, ranked[1:]))


def test_a_torn_feature_index_is_computed_again_not_a_traceback(trained, tiny_llama, tmp_path):
    """features.json is the cache's commit record; a rerun after it was torn (a crash or power cut while
    it was written) makes the features again."""
    from dflash_edge.train.features import FeatureStore

    root, _ = trained
    work = tmp_path / "work"
    work.mkdir()
    for name in ("sequences.jsonl", "features.f16", "greedy.i32"):
        (work / name).hardlink_to(root / "drafter.work" / name)  # replaced by rename, never written through
    index = (root / "drafter.work" / "features.json").read_text()
    (work / "features.json").write_text(index[: len(index) // 2])
    cmd = [sys.executable, "-m", "dflash_edge.train.cli", "--target", str(tiny_llama[0]), "--data",
           str(root / "prompts.jsonl"), "--output", str(tmp_path / "drafter"), "--work", str(work),
           "--steps", "1", "--anchors", "16", "--batch", "1", "--block-size", "8", "--mask-token-id", "3",
           "--eval-every", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cached sequences" in out.stdout and "computing tap features" in out.stdout, out.stdout
    assert (work / "features.json").read_text() == index and FeatureStore.exists(work)
    assert not list(work.glob("*.tmp"))


def _feature_cache(folder, lengths=(3, 5), width=4):
    import numpy as np

    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    np.memmap(folder / "features.f16", dtype=np.float16, mode="w+", shape=(offsets[-1], width)).flush()
    np.memmap(folder / "greedy.i32", dtype=np.int32, mode="w+", shape=(offsets[-1],)).flush()
    index = json.dumps({"offsets": offsets, "width": width, "top_k": 0})
    (folder / "features.json").write_text(index)
    return index


@pytest.mark.parametrize("damage", ["torn index", "index without offsets", "short features", "short choices"])
def test_an_incomplete_feature_cache_counts_as_absent(tmp_path, damage):
    from dflash_edge.train.features import FeatureStore

    index = _feature_cache(tmp_path)
    assert FeatureStore.exists(tmp_path) and len(FeatureStore(tmp_path)[1]) == 5
    if damage == "torn index":
        (tmp_path / "features.json").write_text(index[:-9])
    elif damage == "index without offsets":
        (tmp_path / "features.json").write_text(json.dumps({"width": 4}))
    else:  # renamed in place, but the data before the rename never reached the disk
        name = "features.f16" if damage == "short features" else "greedy.i32"
        with open(tmp_path / name, "r+b") as f:
            f.truncate(8)
    assert not FeatureStore.exists(tmp_path)


def test_a_torn_inputs_record_makes_the_caches_again(tmp_path, capsys):
    from dflash_edge.train.cli import forget_stale_caches

    for name in ("sequences.jsonl", "features.json", "features.f16", "state.pt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "inputs.json").write_text('{"target": "tiny", "da')
    forget_stale_caches(tmp_path, {"target": "tiny", "data": "prompts.jsonl"})
    assert list(tmp_path.iterdir()) == [] and "made again" in capsys.readouterr().out


def test_an_atomic_write_that_fails_leaves_the_old_file_whole(tmp_path):
    from dflash_edge.atomic import write_atomic, write_text_atomic

    path = tmp_path / "history.json"
    write_text_atomic(path, '{"step": 1}')

    def dies_half_way(f):
        f.write(b'{"st')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies_half_way)
    assert path.read_text() == '{"step": 1}' and [p.name for p in tmp_path.iterdir()] == ["history.json"]
    write_text_atomic(path, '{"step": 2}')
    assert path.read_text() == '{"step": 2}'


def _tiny_target(tiny_llama):
    from dflash_edge.export.drafter import default_tap_layer_ids
    from dflash_edge.export.modeling import load_target_from_hf
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama[0], torch_dtype=torch.float32)
    return load_target_from_hf(hf, default_tap_layer_ids(hf.config.num_hidden_layers),
                               qk_norm=hf.config.model_type == "qwen3")


def test_interrupted_regeneration_resumes_without_redoing_finished_batches(tmp_path, tiny_llama):
    from dflash_edge.train.data import regenerate

    target = _tiny_target(tiny_llama)
    rng = random.Random(1)
    prompts = [[rng.randrange(4, 60) for _ in range(rng.randint(2, 9))] for _ in range(10)]
    fresh = regenerate(target, prompts, 12, 4, "cpu", set(), log=lambda *a: None)
    partial = tmp_path / "partial.jsonl"
    regenerate(target, prompts[:6], 12, 4, "cpu", set(), log=lambda *a: None, partial=partial)
    lines = partial.read_text().splitlines()
    assert len(lines) == 6
    partial.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # killed while writing the sixth
    logs = []
    resumed = regenerate(target, prompts, 12, 4, "cpu", set(), log=logs.append, partial=partial)
    assert "5 replies already" in logs[0]
    assert [s.tokens for s in resumed] == [s.tokens for s in fresh]
    assert all(s.loss_mask == [0] * len(p) + [1] * 12 for s, p in zip(resumed, prompts))
    # The torn row was cut off before appending: every row is whole, and a third run redoes nothing.
    assert sorted(json.loads(line)["index"] for line in partial.read_text().splitlines()) == list(range(10))
    logs = []
    regenerate(target, prompts, 12, 4, "cpu", set(), log=logs.append, partial=partial)
    assert "10 replies already" in logs[0]


def test_bf16_target_keeps_fp32_rotary_frequencies(tiny_llama):
    from dflash_edge.train.cli import to_bf16

    target = _tiny_target(tiny_llama)
    ids = torch.tensor([[5, 9, 13, 22, 7, 8, 30, 31]])
    pos = torch.arange(900, 908)[None]  # far positions, where bf16 rotary angles would be off by radians

    def taps():
        with torch.no_grad():
            return target(ids, pos, torch.ones_like(ids), torch.tensor([7]), *target.empty_cache(1))[1].float()

    reference = taps()
    to_bf16(target)
    assert target.embed_tokens.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for name, b in target.named_buffers() if "inv_freq" in name)
    error = (taps() - reference).norm() / reference.norm()
    assert error < 0.03, error


def test_target_argmax_mode_returns_the_argmax_of_every_requested_row(tiny_llama):
    target = _tiny_target(tiny_llama)
    ids = torch.tensor([[5, 9, 13, 22, 7, 8, 30, 31]])
    args = (ids, torch.arange(8)[None], torch.ones_like(ids), torch.arange(8), *target.empty_cache(1))
    with torch.no_grad():
        logits, taps, *_ = target(*args)
        choices, taps_too, *_ = target(*args, argmax=True)
    assert torch.equal(choices, logits.argmax(-1)) and torch.equal(taps, taps_too)


def _greedy_without_cache(target, prompt, max_new, stops):
    """The target's greedy reply by recomputing the whole sequence each step (no cache, no padding)."""
    seq, reply = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            ids = torch.tensor([seq])
            logits, *_ = target(ids, torch.arange(len(seq))[None], torch.ones_like(ids),
                                torch.tensor([len(seq) - 1]), *target.empty_cache(1))
            token = int(logits[0, -1].argmax())
            reply.append(token)
            seq.append(token)
            if token in stops:
                break
    return reply


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_generation_matches_decoding_each_prompt_alone(arch, request):
    from dflash_edge.train.generate import greedy_batch

    target = _tiny_target(request.getfixturevalue(f"tiny_{arch}"))
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 60) for _ in range(rng.randint(1, 9))] for _ in range(9)]
    want = [_greedy_without_cache(target, p, 14, set()) for p in prompts]
    assert greedy_batch(target, prompts, 14, set(), "cpu") == want  # left padding, cache, many steps
    # Rows that hit a stop id end there and leave the batch; the others carry on unchanged.
    stops = {want[0][2], want[4][5]}
    ended = [_greedy_without_cache(target, p, 14, stops) for p in prompts]
    assert any(len(r) < 14 for r in ended) and any(len(r) == 14 for r in ended)
    assert greedy_batch(target, prompts, 14, stops, "cpu") == ended
    # The attention regeneration and the feature pass use (fused) gives the exported graph's results.
    fused = _tiny_target(request.getfixturevalue(f"tiny_{arch}")).fuse_attention()
    assert greedy_batch(fused, prompts, 14, set(), "cpu") == want
    ids = torch.tensor([[5, 9, 13, 22, 7, 8, 30, 31]])
    args = (ids, torch.arange(8)[None], torch.ones_like(ids), torch.arange(8))
    with torch.no_grad():
        want_logits, want_taps, *_ = target(*args, *target.empty_cache(1))
        got, got_taps, *_ = fused(*args, *fused.empty_cache(1))
    assert torch.allclose(got, want_logits, atol=1e-4) and torch.allclose(got_taps, want_taps, atol=1e-4)


def test_fused_attention_keeps_packed_blocks_apart():
    cfg = DrafterConfig.from_dict({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                                   "vocab_size": 50, "mask_token_id": 0, "target_layer_ids": [0, 1],
                                   "block_size": 4})
    drafter = random_drafter(cfg)
    drafter.attach_target(torch.randn(50, 32), torch.randn(50, 32))
    anchors, s = torch.tensor([2, 7]), 12
    positions = (anchors[:, None] + torch.arange(4)).flatten()[None]
    context = drafter.context_kv(torch.randn(1, s, 64), torch.arange(s)[None])
    embeds = drafter.embed(torch.randint(50, (1, 8)))
    bias = block_mask_bias(anchors, s, 4)
    with torch.no_grad():
        want = drafter.block_hidden(embeds, positions, context, bias)
        got = drafter.block_hidden(embeds, positions, context, bias, fused=True)
    assert torch.allclose(got, want, atol=1e-5)


def test_acceptance_replay_matches_the_runtime_loop_round_for_round(trained, tiny_llama, tmp_path):
    from collections import Counter

    from dflash_edge.export.drafter import write_draft_vocab
    from dflash_edge.export.pipeline import export
    from dflash_edge.runtime.api import DFlashModel

    root, _ = trained
    prompts = ["hello world", "the cat sat", "def sort list", "a b c"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    def assert_same_rounds(replay, drafter, name):
        model = DFlashModel(export(str(tiny_llama[0]), str(tmp_path / name), drafter=str(drafter),
                                   log=lambda *a: None))
        for block in (8, 4):
            runtime = Counter()
            for p in prompts:
                runtime += model.generate(p, 30, block).stats.acceptance
            assert replay[str(block)]["acceptance_histogram"] == {str(k): runtime[k] for k in sorted(runtime)}

    cmd = [sys.executable, "-m", "dflash_edge.train.acceptance", "--target", str(tiny_llama[0]), "--drafter",
           str(root / "drafter"), "--dataset", str(data), "--block-size", "8", "4", "--max-new-tokens", "30",
           "--json", str(tmp_path / "acc.json"), "--replies", str(tmp_path / "replies")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    replay = json.loads((tmp_path / "acc.json").read_text())["datasets"][str(data)]["blocks"]
    # A second run reuses the kept replies and replays the same rounds.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "4 replies already" in again.stderr, again.stderr[-2000:]
    assert json.loads((tmp_path / "acc.json").read_text())["datasets"][str(data)]["blocks"] == replay
    assert_same_rounds(replay, root / "drafter", "onnx")
    assert replay["8"]["tau_pooled"] > 1.2  # a trained drafter, so the rounds are not all trivial
    # A drafter with a reduced head (draft_vocab.json): the replay scores the rows the export keeps.
    small = tmp_path / "drafter-small"
    shutil.copytree(root / "drafter", small)
    kept = next((tmp_path / "replies").glob("*.jsonl")).read_text().splitlines()
    write_draft_vocab(small, list(dict.fromkeys(t for line in kept for t in json.loads(line)["tokens"]))[:12], 0.5)
    cmd[cmd.index(str(root / "drafter"))] = str(small)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "scores 12 of" in out.stderr, out.stderr[-2000:]
    replay = json.loads((tmp_path / "acc.json").read_text())["datasets"][str(data)]["blocks"]
    assert_same_rounds(replay, small, "onnx-small")


def test_bf16_on_a_cpu_without_bf16_instructions_is_flagged(monkeypatch):
    from dflash_edge.train.cli import slow_bf16_warning

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    warning = slow_bf16_warning("cpu")
    assert warning and "--precision bf16" in warning and "\n" not in warning
    assert slow_bf16_warning("cuda") is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert slow_bf16_warning("cpu") is None


def test_the_loss_never_sees_features_at_or_after_its_anchor():
    """End to end through dflash_loss (not its helpers): a block drafts what follows its anchor from the
    features before it; changing the features at or after the anchor must not move the loss, changing
    one before it must (so the test can fail, e.g. if the loss ran without its mask)."""
    drafter = _small_drafter()
    g = torch.Generator().manual_seed(0)
    features = torch.randn(12, len(drafter.config.target_layer_ids) * drafter.config.hidden_size, generator=g)
    tokens = torch.randint(0, 40, (12,), generator=g)
    anchor = torch.tensor([5])
    with torch.no_grad():
        base, _ = dflash_loss(drafter, features, tokens, torch.ones(12), anchor, 7.0)
        later = features.clone()
        later[5:] = torch.randn(7, features.shape[1], generator=g) * 10
        same, _ = dflash_loss(drafter, later, tokens, torch.ones(12), anchor, 7.0)
        earlier = features.clone()
        earlier[4] = torch.randn(features.shape[1], generator=g) * 10
        moved, _ = dflash_loss(drafter, earlier, tokens, torch.ones(12), anchor, 7.0)
    assert torch.allclose(same, base, rtol=0, atol=1e-6)
    assert not torch.allclose(moved, base, rtol=0, atol=1e-4)
