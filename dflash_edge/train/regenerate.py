"""Regenerate replies with the target into a shard folder that grows run after run.

    python -m dflash_edge.train.regenerate --prompts data/smollm2-135m/prompts/templates.jsonl \\
        --output data/smollm2-135m/shards --minutes 120

The target answers every prompt (greedy, chat template, up to --max-new-tokens), batched, in file order
(several files mixed in proportion).
Prompts already answered in the folder are skipped, so the same command continues where the last run
stopped; every batch lands atomically (shards.py). `--minutes` ends the run cleanly after the batch that
crosses the budget, which lets a session regenerate in the background and commit what it made.
dflash-train reads the folder with --shards.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import UserError, run_cli


def read_conversations(path: Path) -> list[tuple[list[dict], str]]:
    """(conversation ending with a user turn, source label) per jsonl row ("prompt" or "messages")."""
    from .data import read_prompts

    return [(conv, str(row.get("source", path.stem))) for conv, row in read_prompts(path, with_rows=True)]


def interleave(files: list[list]) -> list:
    """The rows of several prompt files mixed in proportion (each file's order kept), so that a run that
    answers only part of them answers a fair share of each."""
    keyed = [((j + 0.5) / len(rows), f, row) for f, rows in enumerate(files) for j, row in enumerate(rows)]
    return [row for *_, row in sorted(keyed, key=lambda k: k[:2])]


def target_info(name: str, source) -> dict:
    """What the manifest says about the target: the name asked for, and a fingerprint of its files."""
    from .shards import file_sha256

    if source.gguf_file:
        files = [source.path / source.gguf_file]
    else:
        files = sorted(source.path.glob("*.safetensors")) + [source.path / "config.json"]
    return {"name": name, "files": [f.name for f in files],
            "sha256": [file_sha256(f) for f in files if f.is_file()]}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dflash_edge.train.regenerate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m", help="alias, Hugging Face folder or .gguf (as dflash-export)")
    p.add_argument("--prompts", required=True, nargs="+", help="jsonl files: a \"prompt\" or \"messages\" per line")
    p.add_argument("--output", required=True, help="shard folder (created, or continued)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="replies generated together (64 is fastest on 2 cores)")
    p.add_argument("--minutes", type=float, default=None, help="stop after the batch that crosses this budget")
    p.add_argument("--limit", type=int, default=None, help="answer at most this many new prompts")
    p.add_argument("--shard-sequences", type=int, default=1024, help="sequences per shard file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the target's dtype; the replies should be the fp32 target's (bf16 changes a few)")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("max_new_tokens", "batch", "shard_sequences"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    todo = interleave([[(conv, src, path) for conv, src in read_conversations(path)] for path in map(Path, args.prompts)])

    from .shards import ShardWriter, answered_ids, conversation_id, file_sha256, summary
    done = answered_ids(output)
    seen, pending = set(done), []
    for conv, src, path in todo:
        cid = conversation_id(conv)
        if cid not in seen:  # answered before, or a duplicate inside the files
            seen.add(cid)
            pending.append((cid, conv, src, path))
    pending = pending[: args.limit]
    print(f"{len(todo)} prompts, {len(done)} already answered in {output}, {len(pending)} to answer")
    if not pending:
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch sees no CUDA device")
    from .cli import to_bf16
    from .data import chat_prompts, load_frozen_target
    from .generate import greedy_batch

    frozen = load_frozen_target(args.target, args.device)
    source, tokenizer, target, stops = frozen.source, frozen.tokenizer, frozen.module, frozen.stops
    template_kwargs = frozen.template_kwargs
    if args.precision == "bf16":
        to_bf16(target)
    writer = ShardWriter(output, {
        "command": "python -m dflash_edge.train.regenerate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "target": target_info(args.target, source),
        "prompts": [{"file": Path(f).name, "sha256": file_sha256(Path(f))} for f in args.prompts],
        "generation": {"greedy": True, "max_new_tokens": args.max_new_tokens, "precision": args.precision,
                       "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "chat_template": True, "stops": sorted(stops)},
    }, vocab_size=frozen.hf.config.vocab_size, shard_sequences=args.shard_sequences)

    t0, made, answered = time.perf_counter(), 0, 0
    chunk = args.batch * 8
    for c in range(0, len(pending), chunk):
        # Within a chunk, similar lengths share a batch (less padding); across chunks, file order holds, so
        # whatever a run manages to answer is a fair sample of the files.
        rows = pending[c:c + chunk]
        ids = chat_prompts(tokenizer, [conv for _, conv, _, _ in rows], template_kwargs)
        order = sorted(range(len(rows)), key=lambda i: len(ids[i]))
        for b in range(0, len(order), args.batch):
            batch = order[b:b + args.batch]
            replies = greedy_batch(target, [ids[i] for i in batch], args.max_new_tokens, stops, args.device)
            writer.append([(rows[i][0], ids[i], reply, rows[i][2]) for i, reply in zip(batch, replies)])
            made += sum(map(len, replies))
            answered += len(batch)
            elapsed = time.perf_counter() - t0
            eta = (len(pending) - answered) * elapsed / answered
            print(f"  {answered}/{len(pending)} replies, {made} tokens, {made / elapsed:.0f} tok/s, "
                  f"ETA {eta / 3600:.1f} h", flush=True)
            if args.minutes is not None and elapsed > args.minutes * 60:
                print(f"stopping: --minutes {args.minutes:g} reached")
                break
        else:
            continue
        break
    total = summary([output])
    print(f"{output}: {total['shards']} shards, {total['sequences']} sequences, "
          f"{total['reply_tokens']} reply tokens")
    return 0


def entry() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
