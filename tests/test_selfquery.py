"""Prompts the target writes itself, and the evaluation sets kept out of every committed prompt file."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_edge.train.selfquery import MAX_TOKENS, judge, normalized, user_turn_prefix

PROMPT_FILES = sorted((Path(__file__).resolve().parent.parent / "data").glob("*/prompts/*.jsonl"))


def test_the_prefix_ends_where_a_user_message_would_begin():
    from dflash_edge.bench.synthetic import make_tokenizer

    tok = make_tokenizer()
    first = user_turn_prefix(tok, [], {})
    assert tok.decode(first) == "<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\n"
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}]
    second = user_turn_prefix(tok, history, {})
    assert tok.decode(second).endswith("<|im_start|>assistant\nhello world<|im_end|>\n<|im_start|>user\n")
    # The prefix is exactly what the full conversation's rendering starts with.
    full = tok.apply_chat_template(history + [{"role": "user", "content": "the cat"}], tokenize=True)
    assert list(full[:len(second)]) == second


def test_a_query_is_kept_only_when_finished_short_enough_new_and_clean():
    words = {i: w for i, w in enumerate("pad stop sys what is a cat how do I sort list".split())}
    decode = lambda ids: " ".join(words.get(i, "x") for i in ids)  # noqa: E731
    stops, special, seen = {1}, {1, 2}, {normalized("how do I sort list")}
    assert judge([3, 4, 5, 6, 3, 1], stops, special, decode, seen) == ("kept", "what is a cat what")
    assert judge([3, 4, 5, 6, 3], stops, special, decode, seen)[0] == "unfinished"          # cut, no end of turn
    assert judge([3, 2, 5, 6, 3, 1], stops, special, decode, seen)[0] == "unfinished"       # a role marker inside
    assert judge([3, 4, 1], stops, special, decode, seen)[0] == "length"
    assert judge([3] * (MAX_TOKENS + 1) + [1], stops, special, decode, seen)[0] == "length"
    assert judge([7, 8, 9, 10, 11, 1], stops, special, decode, seen)[0] == "repeat"


def test_a_query_that_repeats_an_evaluation_question_is_dropped():
    from dflash_edge.evalsets import load_prompts

    question = load_prompts("mtbench")[0]
    ids = list(range(len(question.split()))) + [999]
    decode = lambda out: " ".join(question.split()[i] for i in out)  # noqa: E731
    assert judge(ids, {999}, {999}, decode, set())[0] in ("evaluation", "length")
    short = "Compose an engaging travel blog post about a recent trip to Hawaii please"
    assert judge(list(range(len(short.split()))) + [999], {999}, {999},
                 lambda out: " ".join(short.split()[i] for i in out), set())[0] == "evaluation"


def test_selfquery_command_writes_rows_and_continues(tiny_llama, tmp_path):
    out_file = tmp_path / "q.jsonl"
    cmd = [sys.executable, "-m", "dflash_edge.train.selfquery", str(out_file), "--target", str(tiny_llama[0]),
           "--count", "3", "--batch", "8", "--minutes", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sampled so far" in out.stdout and "stopping: --minutes" in out.stdout
    assert out_file.is_file()
    for line in out_file.read_text().splitlines():
        row = json.loads(line)
        assert row["source"] == "selfquery" and row["prompt"].strip()
    bad = subprocess.run(cmd + ["--follow-up", str(tmp_path / "q.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and "go together" in bad.stderr


def test_follow_ups_take_first_turns_the_target_finished(tmp_path):
    from dflash_edge.bench.synthetic import make_tokenizer
    from dflash_edge.train.selfquery import first_turns_with_replies
    from dflash_edge.train.shards import ShardWriter, conversation_id

    tok = make_tokenizer()
    prompts = ["the cat", "the dog", "hello world"]
    (tmp_path / "first.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for p, reply in zip(prompts, ["a big cat", "a small dog"]):
        conv = [{"role": "user", "content": p}]
        ids = tok.apply_chat_template(conv, add_generation_prompt=True)
        reply_ids = tok(reply, add_special_tokens=False).input_ids + ([end] if p == "the cat" else [])
        rows.append((conversation_id(conv), list(ids), reply_ids, "selfquery"))
    ShardWriter(tmp_path / "shards", {}, vocab_size=len(tok)).append(rows)
    turns = first_turns_with_replies(tmp_path / "first.jsonl", tmp_path / "shards", tok, {end})
    # "the dog"'s reply was cut before its end of turn; "hello world" was never answered.
    assert turns == [[{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a big cat"}]]


@pytest.mark.skipif(not PROMPT_FILES, reason="no committed prompt files")
def test_committed_prompts_are_many_distinct_and_never_from_the_evaluation_sets():
    """Every prompt the repository regenerates from: 20,000+ in all, no repeats, none overlapping HumanEval
    or MT-Bench (both turns) by the decontamination rule."""
    from dflash_edge.train.data import conversation
    from dflash_edge.train.decontaminate import contaminated

    seen, total = set(), 0
    for path in PROMPT_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            conv = conversation(json.loads(line))
            key = json.dumps(conv, sort_keys=True)
            assert key not in seen, (path.name, conv)
            seen.add(key)
            total += 1
            for turn in conv:
                if turn["role"] == "user":
                    assert not contaminated(turn["content"]), (path.name, turn["content"])
    assert total >= 20_000, total


def test_the_decontamination_rule_catches_the_evaluation_sets_and_paraphrases():
    from dflash_edge.evalsets import load_prompts
    from dflash_edge.train.decontaminate import contaminated

    turns = load_prompts("mtbench", all_turns=True)
    caught = sum(contaminated(t) for t in turns)
    assert caught >= len(turns) - 4  # a handful of 2-4-word second turns ("Can you parallelize it?") pass
    assert all(contaminated(p) for p in load_prompts("humaneval"))
    assert contaminated("Please write a function below_zero(operations) for my bank app")
    assert not contaminated("Write a Python function that multiplies two matrices.")
    assert not contaminated("Can you help me plan a trip to Hawaii with my family?")
