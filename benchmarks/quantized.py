"""Plain decoding of several exports of one model, side by side in one process: speed, and how closely
each follows the first export's greedy output (a quantized target is a different target).

    python benchmarks/quantized.py exports/smollm2-135m exports/smollm2-int8 exports/smollm2-int4 \
        --dataset humaneval mtbench --limit 8 [--max-new-tokens 256] [--json PATH]

Every prompt runs on every export in turn (the order rotates from prompt to prompt), so a machine that
speeds up or slows down during the run affects all of them alike. Reported per export and dataset: median
decode tokens/s over the prompts, the median ratio to the first export on the same prompt, how many
replies equal the first export's token for token, the mean length of the common prefix, and how often
the export's greedy choice equals the first export's along the first export's own reply (teacher-forced:
one flip ends a common prefix for good, while this counts every position of the reply).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_edge.bench.cli import load_dataset  # noqa: E402
from dflash_edge.runtime.api import DFlashModel  # noqa: E402
from dflash_edge.runtime.generate import generate  # noqa: E402


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def agreement(model, ids: list[int], reply: list[int]) -> tuple[int, int]:
    """(positions where model's greedy choice equals reply's next token, positions) along ids + reply."""
    cache = model.new_target_cache(len(ids) + len(reply))
    choices = model.run_target(ids + reply, cache, last_only=False).next_ids[len(ids) - 1:-1]
    return int(sum(int(c) == t for c, t in zip(choices, reply))), len(reply)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="exported folders; the first is the reference")
    p.add_argument("--dataset", nargs="+", default=["humaneval", "mtbench"])
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    engines = [DFlashModel(m, use_drafter=False) for m in args.models]
    names = [Path(m).name for m in args.models]
    report = {"models": args.models, "max_new_tokens": args.max_new_tokens, "datasets": {}}
    for dataset in args.dataset:
        prompts = load_dataset(dataset)[: args.limit]
        rows = {name: {"tok_s": [], "ratio": [], "identical": 0, "prefix": [], "agree": [0, 0]} for name in names}
        for i, prompt in enumerate(prompts):
            outs, speeds = {}, {}
            order = list(range(len(engines)))
            order = order[i % len(order):] + order[: i % len(order)]
            for k in order:
                ids = engines[k].prompt_ids(prompt)
                out, stats = generate(engines[k].model, ids, args.max_new_tokens, block_size=1)
                outs[names[k]], speeds[names[k]] = out, stats.decode_tokens_per_s
            ref = outs[names[0]]
            for name in names:
                r = rows[name]
                r["tok_s"].append(speeds[name])
                r["ratio"].append(speeds[name] / speeds[names[0]])
                r["identical"] += outs[name] == ref
                r["prefix"].append(common_prefix(outs[name], ref))
            for k, name in enumerate(names):
                same, total = agreement(engines[k].model, engines[k].prompt_ids(prompt), ref)
                rows[name]["agree"][0] += same
                rows[name]["agree"][1] += total
            print(f"{dataset} {i + 1}/{len(prompts)}: " + "  ".join(
                f"{n} {speeds[n]:.1f} tok/s" for n in names), file=sys.stderr, flush=True)
        summary = {name: {"decode_tok_s": round(statistics.median(r["tok_s"]), 1),
                          "vs_first": round(statistics.median(r["ratio"]), 2),
                          "identical": f"{r['identical']}/{len(prompts)}",
                          "common_prefix": round(statistics.mean(r["prefix"]), 1),
                          "agreement": round(r["agree"][0] / max(1, r["agree"][1]), 4)}
                   for name, r in rows.items()}
        report["datasets"][dataset] = summary
        print(f"\n{dataset}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, plain greedy decoding")
        print(f"| export | decode tok/s | vs {names[0]} | replies identical to {names[0]} | common prefix (tokens) "
              f"| same choice along {names[0]}'s replies |")
        print("|---|---|---|---|---|---|")
        for name, s in summary.items():
            print(f"| {name} | {s['decode_tok_s']} | {s['vs_first']:.2f}x | {s['identical']} | {s['common_prefix']} "
                  f"| {100 * s['agreement']:.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
