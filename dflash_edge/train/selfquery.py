"""Prompts the target writes itself (Magpie-style self-queries), so that regeneration can scale offline.

An instruction-tuned model given its chat template only up to the opening of a user turn writes what a
user of it would ask. Each query is sampled (temperature 1, top-p 0.95) until the end-of-turn token;
queries of 5-60 tokens are kept, repeats dropped (also against --exclude files) and every one is checked
against the evaluation sets (decontaminate.py). The follow-up variant opens a second user turn after a
first query and the target's own greedy reply, taken from a shard folder: multi-turn chat.

    python -m dflash_edge.train.selfquery data/smollm2-135m/prompts/selfquery.jsonl --count 8000
    python -m dflash_edge.train.selfquery data/smollm2-135m/prompts/selfquery-followup.jsonl --count 2000 \\
        --follow-up data/smollm2-135m/prompts/selfquery.jsonl --shards data/smollm2-135m/shards

The output grows batch by batch (rewritten atomically), so rerunning the command continues it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import UserError, run_cli

MARK = "\u2063QUERY\u2063"  # a string no chat template writes, to find where the user's text would start
MIN_TOKENS, MAX_TOKENS = 5, 60


def normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def user_turn_prefix(tokenizer, history: list[dict], template_kwargs: dict) -> list[int]:
    """Token ids of the chat template rendered up to where a new user message's text begins."""
    text = tokenizer.apply_chat_template(history + [{"role": "user", "content": MARK}], tokenize=False,
                                         add_generation_prompt=False, **template_kwargs)
    if text.count(MARK) != 1:
        raise UserError("the target's chat template does not render a user turn; self-queries need one")
    return list(tokenizer(text.split(MARK)[0], add_special_tokens=False).input_ids)


def read_rows(path: Path) -> list[dict]:
    from ..jsonl import read_jsonl

    return [row for _, row in read_jsonl(path)] if path.is_file() else []


def write_rows(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def judge(out: list[int], stops: set[int], special: set[int], decode, seen: set[str]) -> tuple[str, str | None]:
    """("kept", the query) for a sampled turn worth keeping, else (why not, None)."""
    if not out or out[-1] not in stops or special & set(out[:-1]):
        return "unfinished", None
    if not MIN_TOKENS <= len(out) - 1 <= MAX_TOKENS:
        return "length", None
    text = decode(out[:-1]).strip()
    if not normalized(text) or normalized(text) in seen:
        return "repeat", None
    from .decontaminate import contaminated

    if contaminated(text):
        return "evaluation", None
    return "kept", text


def first_turns_with_replies(follow_up: Path, shards: Path, tokenizer, stops: set[int]) -> list[list[dict]]:
    """[user, assistant] conversations: first-turn prompts of `follow_up` the shard folder has answered."""
    from .data import read_prompts
    from .shards import conversation_id, read_shards

    answered = {}
    for shard in read_shards([shards]):
        for i, cid in enumerate(shard.prompt_ids.tolist()):
            tokens, prompt_len = shard.sequence(i)
            answered[cid] = tokens[prompt_len:]
    out = []
    for conv in read_prompts(follow_up):
        reply = answered.get(conversation_id(conv))
        if len(conv) == 1 and reply and reply[-1] in stops:  # a reply cut at max_new_tokens is no turn
            out.append(conv + [{"role": "assistant", "content": tokenizer.decode(reply[:-1]).strip()}])
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dflash_edge.train.selfquery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="jsonl to write (continued if it exists)")
    p.add_argument("--count", type=int, required=True, help="rows the file should hold")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--follow-up", default=None, help="first-turn prompts (jsonl) to write second turns for")
    p.add_argument("--shards", default=None, help="with --follow-up: the shard folder holding their replies")
    p.add_argument("--exclude", nargs="*", default=[], help="prompt files whose prompts must not be repeated")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--minutes", type=float, default=None, help="stop after the batch that crosses this budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.count < 1 or args.batch < 1:
        raise UserError("--count and --batch must be at least 1")
    if not args.temperature > 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be positive and --top-p in (0, 1]")
    if bool(args.follow_up) != bool(args.shards):
        raise UserError("--follow-up and --shards go together")
    output = Path(args.output)
    rows = read_rows(output)
    from .data import conversation

    def user_turns(rows_of_a_file: list[dict]) -> set[str]:
        return {normalized(m["content"]) for r in rows_of_a_file for m in (conversation(r) or []) if m["role"] == "user"}

    seen = user_turns(rows)
    for path in map(Path, args.exclude):
        if not path.is_file():
            raise UserError(f"--exclude {path} is not a file")
        seen |= user_turns(read_rows(path))
    if len(rows) >= args.count:
        print(f"{output} already holds {len(rows)} rows")
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .data import load_frozen_target
    from .generate import greedy_batch

    frozen = load_frozen_target(args.target)
    tokenizer, target, stops, template_kwargs = frozen.tokenizer, frozen.module, frozen.stops, frozen.template_kwargs
    special = set(tokenizer.all_special_ids)

    histories: list[list[dict]] = [[]]
    if args.follow_up:
        used = {json.dumps(r["messages"][:2], sort_keys=True) for r in rows if "messages" in r}
        histories = [h for h in first_turns_with_replies(Path(args.follow_up), Path(args.shards), tokenizer, stops)
                     if json.dumps(h, sort_keys=True) not in used]
        if not histories:
            raise UserError(f"no first turn of {args.follow_up} has a finished reply in {args.shards} "
                            f"that is not followed up already")
    print(f"{output}: {len(rows)} rows, writing up to {args.count}")
    counts = {"kept": 0, "unfinished": 0, "length": 0, "repeat": 0, "evaluation": 0}
    t0, batch_no = time.perf_counter(), 0
    while len(rows) < args.count and histories:
        if args.follow_up:
            batch, histories = histories[:args.batch], histories[args.batch:]
        else:
            batch = [[] for _ in range(args.batch)]
        prefixes = [user_turn_prefix(tokenizer, h, template_kwargs) for h in batch]
        # A different stream for every batch and every resumed run, reproducible from the seed.
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + len(rows) * 1_009 + batch_no)
        outs = greedy_batch(target, prefixes, MAX_TOKENS + 1, stops, "cpu", args.temperature, generator,
                            top_p=args.top_p)
        batch_no += 1
        for history, out in zip(batch, outs):
            verdict, text = judge(out, stops, special, tokenizer.decode, seen)
            counts[verdict] += 1
            if text is None:
                continue
            seen.add(normalized(text))
            if history:
                rows.append({"messages": history + [{"role": "user", "content": text}], "source": "selfquery-followup"})
            else:
                rows.append({"prompt": text, "source": "selfquery"})
        write_rows(output, rows[:args.count])
        elapsed = time.perf_counter() - t0
        print(f"  {min(len(rows), args.count)}/{args.count} rows; sampled so far: "
              + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {elapsed / 60:.1f} min", flush=True)
        if args.minutes is not None and elapsed > args.minutes * 60:
            print(f"stopping: --minutes {args.minutes:g} reached")
            break
    return 0


def entry() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
