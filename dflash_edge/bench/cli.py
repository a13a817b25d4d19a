"""dflash-bench: DFlash against plain decoding on the same prompts, in one process, side by side.

For every prompt of every dataset it runs plain greedy decoding with the exported target (ORT, no
drafter) and then DFlash at each requested block size, checks that DFlash produced exactly the plain
tokens, and reports tokens/s, time to first token, speed-up and the acceptance length tau with its
histogram. Results go to a JSON file and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from ..errors import UserError, run_cli


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dflash-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by dflash-export, with a drafter")
    p.add_argument("--dataset", nargs="+", default=["humaneval", "mtbench"],
                   help="humaneval, mtbench or a jsonl FILE with a \"prompt\" per line (several allowed)")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each dataset")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, nargs="+", default=None,
                   help="DFlash block sizes to run (default: the drafter's trained size)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--markdown", default=None, help="write the summary table here")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def load_dataset(name: str) -> list[str]:
    from ..evalsets import SETS, load_prompts
    if name in SETS:
        return load_prompts(name)
    path = Path(name)
    if not path.is_file():
        raise UserError(f"--dataset {name}: not {', '.join(SETS)} and not a file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f"{path}:{n} needs a \"prompt\" string")
            prompts.append(row["prompt"])
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def run_one(model, ids: list[int], max_new_tokens: int, block: int) -> dict:
    from ..runtime.generate import generate
    out, stats = generate(model, ids, max_new_tokens, block)
    return {"tokens": out, **stats.as_dict()}


def summarize(rows: list[dict], blocks: list[int]) -> dict:
    """Per-dataset medians and acceptance, from the per-prompt rows."""
    plain = [r["plain"]["decode_tokens_per_s"] for r in rows]
    out = {"prompts": len(rows), "plain_decode_tok_s": statistics.median(plain),
           "plain_ttft_ms": 1000 * statistics.median(r["plain"]["ttft_s"] for r in rows)}
    for b in blocks:
        runs = [r[f"dflash_{b}"] for r in rows]
        hist: dict[str, int] = {}
        for run in runs:
            for k, v in run["acceptance_histogram"].items():
                hist[k] = hist.get(k, 0) + v
        committed = sum(run["new_tokens"] - 1 for run in runs)  # the first token comes from prefill
        out[f"block_{b}"] = {
            "tau_mean": statistics.mean(run["tau"] for run in runs),
            "tau_pooled": committed / max(1, sum(run["rounds"] for run in runs)),
            "decode_tok_s": statistics.median(run["decode_tokens_per_s"] for run in runs),
            "speedup_median": statistics.median(run["decode_tokens_per_s"] / p for run, p in zip(runs, plain)
                                                if p > 0),
            "speedup_total_time": (sum(r["plain"]["decode_s"] for r in rows)
                                   / max(1e-9, sum(run["decode_s"] for run in runs))),
            "mismatches": sum(not r[f"exact_{b}"] for r in rows),
            "acceptance_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        }
    return out


def markdown(summary: dict, blocks: list[int], machine: str, command: str) -> str:
    lines = [f"Machine: {machine}", "", f"Command: `{command}`", "",
             "| dataset | prompts | plain tok/s | block | DFlash tok/s | speed-up (median) | tau (mean) | "
             "exact |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        for b in blocks:
            d = s[f"block_{b}"]
            lines.append(f"| {name} | {s['prompts']} | {s['plain_decode_tok_s']:.1f} | {b} | "
                         f"{d['decode_tok_s']:.1f} | {d['speedup_median']:.2f}x | {d['tau_mean']:.2f} | "
                         f"{s['prompts'] - d['mismatches']}/{s['prompts']} |")
    return "\n".join(lines) + "\n"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    datasets = {name: load_dataset(name)[: args.limit] for name in args.dataset}
    from ..runtime.api import DFlashModel

    dflash = DFlashModel(args.model, args.provider, threads=args.threads)
    if not dflash.model.has_drafter:
        raise UserError(f"{args.model} has no drafter; export it with one (dflash-export --drafter ...)")
    plain = DFlashModel(args.model, args.provider, threads=args.threads, use_drafter=False)
    blocks = [dflash.model.check_block_size(b) for b in (args.block_size or [None])]
    if args.max_new_tokens >= dflash.model.max_context:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context "
                        f"({dflash.model.max_context})")
    # Warm both paths up so the first prompt does not pay session initialisation.
    warm = dflash.prompt_ids("Hello")
    run_one(plain.model, warm, 8, 1)
    run_one(dflash.model, warm, 8, blocks[0])

    results, summary = {}, {}
    total = sum(len(p) for p in datasets.values())
    done, t0 = 0, time.perf_counter()
    for name, prompts in datasets.items():
        rows = []
        for prompt in prompts:
            ids = dflash.prompt_ids(prompt)
            if len(ids) + args.max_new_tokens > dflash.model.max_context:
                print(f"  skipping a {len(ids)}-token prompt of {name}: it does not fit the context", file=sys.stderr)
                continue
            row = {"prompt_tokens": len(ids), "plain": run_one(plain.model, ids, args.max_new_tokens, 1)}
            for b in blocks:
                run = run_one(dflash.model, ids, args.max_new_tokens, b)
                row[f"exact_{b}"] = run["tokens"] == row["plain"]["tokens"]
                row[f"dflash_{b}"] = run
            rows.append(row)
            done += 1
            eta = (time.perf_counter() - t0) / done * (total - done)
            taus = " ".join(f"tau@{b} {row[f'dflash_{b}']['tau']:.2f}" for b in blocks)
            print(f"  [{done}/{total}] {name}: plain {row['plain']['decode_tokens_per_s']:.1f} tok/s, {taus}, "
                  f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
        if not rows:
            raise UserError(f"no prompt of {name} fits the model's context")
        results[name] = rows
        summary[name] = summarize(rows, blocks)

    command = "dflash-bench " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_description()
    table = markdown(summary, blocks, machine, command)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "machine": machine, "summary": summary,
                                               "prompts": results}, indent=1) + "\n")
    mismatches = sum(s[f"block_{b}"]["mismatches"] for s in summary.values() for b in blocks)
    if mismatches:
        print(f"error: DFlash output differed from plain decoding on {mismatches} runs", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
