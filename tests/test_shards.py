"""Reply shards that accumulate over runs: the format, atomic appends, the regeneration command that fills
them and dflash-train reading them (tiny random target)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dflash_edge.errors import UserError
from dflash_edge.train.shards import (MANIFEST, ShardWriter, answered_ids, conversation_id, read_shards,
                                      summary)


def _rows(n, start=0):
    return [(conversation_id([{"role": "user", "content": f"q{start + i}"}]), [1, 2, 3 + i], [7] * (i + 1) + [2],
             "code" if i % 2 else "chat") for i in range(n)]


def test_shards_round_trip_and_a_new_writer_continues_the_folder(tmp_path):
    writer = ShardWriter(tmp_path, {"command": "test"}, vocab_size=1000, shard_sequences=3)
    writer.append(_rows(2))
    writer.append(_rows(2, start=2))      # the open shard reaches 4 >= 3 sequences: the next batch opens another
    writer.append(_rows(1, start=4))
    ShardWriter(tmp_path, {"command": "again"}, vocab_size=1000).append(_rows(1, start=5))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [e["file"] for e in manifest["shards"]] == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert [e["sequences"] for e in manifest["shards"]] == [4, 1, 1]
    assert manifest["shards"][0]["sources"] == {"chat": 2, "code": 2}
    assert manifest["shards"][2]["command"] == "again" and "machine" in manifest["shards"][2]
    shards = read_shards([tmp_path])
    got = [s.sequence(i) for s in shards for i in range(len(s))]
    want = [(p + r, len(p)) for rows in (_rows(2), _rows(2, 2), _rows(1, 4), _rows(1, 5))
            for _, p, r, _ in rows]
    assert got == want
    assert shards[0].tokens.dtype == np.uint16
    assert answered_ids(tmp_path) == {cid for cid, *_ in _rows(6)}
    total = summary([tmp_path])
    assert total["sequences"] == 6 and total["reply_tokens"] == sum(len(s[0]) - s[1] for s in got)


def test_large_vocabularies_take_32_bit_ids(tmp_path):
    ShardWriter(tmp_path, {}, vocab_size=151_936).append([(1, [70_000], [150_000, 2], "x")])
    shards = read_shards([tmp_path])
    assert shards[0].tokens.dtype == np.uint32 and shards[0].sequence(0) == ([70_000, 150_000, 2], 1)


def test_an_interrupted_append_leaves_the_folder_as_it_was(tmp_path):
    writer = ShardWriter(tmp_path, {}, vocab_size=1000)
    writer.append(_rows(2))
    before = (tmp_path / MANIFEST).read_text()
    # A run killed between writing a new shard and the manifest leaves a file the manifest does not list,
    # and one killed while writing leaves a temporary file: neither is read.
    (tmp_path / "shard-00001.npz").write_bytes(b"half")
    (tmp_path / "shard-00000.npz.tmp").write_bytes(b"half")
    assert (tmp_path / MANIFEST).read_text() == before
    assert len(read_shards([tmp_path])) == 1
    ShardWriter(tmp_path, {}, vocab_size=1000).append(_rows(1, start=9))
    assert [len(s) for s in read_shards([tmp_path])] == [2, 1]


def test_damaged_or_foreign_shards_are_refused_in_one_line(tmp_path):
    ShardWriter(tmp_path, {"target": {"name": "big"}}, vocab_size=1000).append([(1, [1, 2], [900, 2], "x")])
    with pytest.raises(UserError, match="beyond the target's vocab"):
        read_shards([tmp_path], vocab_size=500)
    shard = tmp_path / "shard-00000.npz"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(UserError, match="checksum"):
        read_shards([tmp_path])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"][0]["file"] = "../elsewhere.npz"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a file in that folder"):
        read_shards([tmp_path])
    with pytest.raises(UserError, match="not a shard folder"):
        read_shards([tmp_path / "missing"])


def _run(module, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory, tiny_llama):
    from dflash_edge.bench.synthetic import WORDS

    root = tmp_path_factory.mktemp("regen")
    rng = np.random.default_rng(0)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(12):
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))
            f.write(json.dumps({"prompt": words, "source": "chat" if i % 3 else "code"}) + "\n")
        f.write(json.dumps({"prompt": words, "source": "chat"}) + "\n")  # a repeat: answered once
    first = _run("dflash_edge.train.regenerate", "--target", tiny_llama[0], "--prompts", root / "prompts.jsonl",
                 "--output", root / "shards", "--limit", 5, "--batch", 2, "--max-new-tokens", 24)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _run("dflash_edge.train.regenerate", "--target", tiny_llama[0], "--prompts", root / "prompts.jsonl",
                  "--output", root / "shards", "--batch", 4, "--max-new-tokens", 24)
    assert second.returncode == 0, second.stderr[-2000:]
    return root, first.stdout, second.stdout


def test_regeneration_continues_where_the_last_run_stopped(regenerated):
    root, first, second = regenerated
    assert "0 already answered" in first and "5 to answer" in first
    assert "5 already answered" in second and "7 to answer" in second
    manifest = json.loads((root / "shards" / MANIFEST).read_text())
    assert sum(e["sequences"] for e in manifest["shards"]) == 12
    entry = manifest["shards"][-1]
    assert entry["generation"]["max_new_tokens"] == 24 and entry["prompts"][0]["file"] == "prompts.jsonl"
    assert sum(sum(e["sources"].values()) for e in manifest["shards"]) == 12


def test_regenerated_replies_are_the_targets_greedy_replies(regenerated, tiny_llama):
    """Each stored sequence is the chat-templated prompt and, after it, the target's argmax at every step
    (teacher-forced through transformers' own model; a near-tie may go either way in float arithmetic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, *_ = regenerated
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama[0], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama[0])
    prompts = [json.loads(line)["prompt"] for line in (root / "prompts.jsonl").read_text().splitlines()]
    templated = {tuple(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
                 for p in prompts}
    shards = read_shards([root / "shards"])
    checked = 0
    for shard in shards:
        for i in range(len(shard)):
            tokens, prompt_len = shard.sequence(i)
            assert tuple(tokens[:prompt_len]) in templated
            with torch.no_grad():
                logits = hf(torch.tensor([tokens])).logits[0, prompt_len - 1:-1]
            top2 = logits.topk(2).values
            clear = (top2[:, 0] - top2[:, 1]) > 1e-4
            assert (logits.argmax(-1) == torch.tensor(tokens[prompt_len:]))[clear].all()
            checked += 1
    assert checked == 12


def test_training_reads_shards_and_remakes_its_caches_when_they_grow(regenerated, tiny_llama, tmp_path):
    root, *_ = regenerated
    common = ["--target", tiny_llama[0], "--output", tmp_path / "drafter", "--steps", 10, "--anchors", 8,
              "--batch", 1, "--block-size", 8, "--mask-token-id", 3, "--eval-every", 10]
    out = _run("dflash_edge.train.cli", "--shards", root / "shards", *common)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "12 replies from 1 shard folder" in out.stdout
    report = json.loads((tmp_path / "drafter" / "training_report.json").read_text())
    assert report["sequences"] == 12
    # Same inputs: the caches serve again. A subset of the shards: they are made again.
    again = _run("dflash_edge.train.cli", "--shards", root / "shards", *common)
    assert "cached sequences" in again.stdout and "cached features" in again.stdout
    subset = _run("dflash_edge.train.cli", "--shards", root / "shards", "--shard-tokens", 60, *common)
    assert subset.returncode == 0, subset.stderr[-2000:]
    assert "inputs changed" in subset.stdout and "cached features" not in subset.stdout
    report = json.loads((tmp_path / "drafter" / "training_report.json").read_text())
    assert 1 <= report["sequences"] < 12 and report["tokens"] <= 60 + 40


def test_training_continues_from_a_checkpoint(regenerated, tiny_llama, tmp_path):
    """--init starts from a drafter's weights: before any step it scores what that drafter scores."""
    root, *_ = regenerated
    common = ["--target", tiny_llama[0], "--shards", root / "shards", "--anchors", 8, "--batch", 1,
              "--block-size", 8, "--mask-token-id", 3, "--eval-every", 40, "--lr", 3e-3]
    first = _run("dflash_edge.train.cli", *common, "--output", tmp_path / "a", "--steps", 40)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = _run("dflash_edge.train.cli", *common, "--output", tmp_path / "b", "--steps", 10,
                   "--init", tmp_path / "a", "--work", tmp_path / "a.work-2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "a" / "training_report.json").read_text())["history"]
    b = json.loads((tmp_path / "b" / "training_report.json").read_text())["history"]
    # The same held-out split (same seed, same sequences): step 0 of the second run is the first run's end,
    # up to the bf16 rounding of the checkpoint.
    assert b[0]["loss"] == pytest.approx(a[-1]["loss"], rel=0.02) and b[0]["loss"] < 0.9 * a[0]["loss"]
    wrong = _run("dflash_edge.train.cli", *common, "--output", tmp_path / "c", "--init", tmp_path / "a",
                 "--taps", 0)
    assert wrong.returncode == 2 and "drop --taps" in wrong.stderr


def test_training_needs_some_data(tiny_llama, tmp_path):
    out = _run("dflash_edge.train.cli", "--target", tiny_llama[0], "--output", tmp_path / "d")
    assert out.returncode == 2 and "--data" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("vocab", [300, 3000])
def test_nucleus_sampling_draws_from_the_nucleus_only(vocab):
    """Small vocabularies, and rows whose nucleus is wider than the partial sort's 512 tokens."""
    from dflash_edge.train.generate import sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=g) * torch.tensor([[3.0], [1.0], [0.1], [0.02]])
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    nucleus = [set(order[r, :int((sorted_probs[r].cumsum(0) - sorted_probs[r] < 0.9).sum())].tolist())
               for r in range(4)]
    draws = torch.stack([sample(logits, 1.0, 0.9, g) for _ in range(400)], 1)
    for r in range(4):
        seen = set(draws[r].tolist())
        assert seen <= nucleus[r]
        assert len(seen) >= min(len(nucleus[r]), 30) * 0.5
    if vocab > 512:
        assert max(len(n) for n in nucleus) > 512  # the whole-sort path ran


def test_soft_targets_and_dpace_train_from_shards(regenerated, tiny_llama, tmp_path):
    from dflash_edge.train.features import FeatureStore

    root, *_ = regenerated
    out = _run("dflash_edge.train.cli", "--target", tiny_llama[0], "--shards", root / "shards", "--output",
               tmp_path / "drafter", "--steps", 30, "--anchors", 8, "--batch", 1, "--block-size", 8,
               "--mask-token-id", 3, "--eval-every", 30, "--lr", 3e-3, "--labels", "target",
               "--soft-targets", 4, "--dpace", 0.2)
    assert out.returncode == 0, out.stderr[-2000:]
    history = json.loads((tmp_path / "drafter" / "training_report.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    store = FeatureStore(tmp_path / "drafter.work")
    assert store.top_k == 4
    for i in range(3):
        ids, probs = store.soft(i)
        # The cached top-1 is the target's choice; probabilities come sorted and within one.
        assert torch.equal(ids[:, 0], store.greedy(i))
        assert torch.all(probs[:, :-1] >= probs[:, 1:]) and torch.all(probs.sum(-1) <= 1.001)


def test_a_planted_training_state_is_refused_not_unpickled(regenerated, tiny_llama, tmp_path):
    """state.pt loads with weights_only: a pickle that would run code is refused in one line."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    root, *_ = regenerated
    common = ["--target", tiny_llama[0], "--shards", root / "shards", "--anchors", 8, "--batch", 1,
              "--block-size", 8, "--mask-token-id", 3, "--steps", 5, "--eval-every", 5, "--output", tmp_path / "d"]
    first = _run("dflash_edge.train.cli", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "d.work" / "state.pt").write_bytes(pickle.dumps(Payload()))
    out = _run("dflash_edge.train.cli", *common)
    assert out.returncode == 2 and "not a training state" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "pwned").exists()
    # Another drafter shape over the same work folder's state: one line too.
    (tmp_path / "d.work" / "state.pt").unlink()
    assert _run("dflash_edge.train.cli", *common).returncode == 0
    wider = _run("dflash_edge.train.cli", *common, "--draft-layers", 2)
    assert wider.returncode == 2 and "differently shaped drafter" in wider.stderr
