"""Target-graph call costs of several exports side by side: a decode step and a verify at two context
lengths, and a prompt's prefill.

    python benchmarks/graph_costs.py exports/old exports/new [--contexts 256 2000] [--block 16]
        [--prompt 512] [--rounds 3] [--repeats 15]

For comparing two builds of one model's graph. Each export is measured in a process of its own (two
sessions in one process disturb each other: a session's threads spin for a while after each call), the
exports taking turns round after round, so a shared machine's changes of speed fall on all of them alike.
The table gives, per export, the median over rounds of each round's median, in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(folder: str, contexts: list[int], block: int, prompt: int, repeats: int) -> dict:
    from dflash_edge.runtime.model import ExportedModel
    from dflash_edge.runtime.policy import filled_cache, run_times

    model = ExportedModel(folder)
    calls = {}
    for c in contexts:
        cache = filled_cache(model, c)[0]
        calls[f"step @ {c}"] = lambda cache=cache: model.run_target([1], cache, last_only=True)
        calls[f"verify {block} @ {c}"] = lambda cache=cache: model.run_target([1] * block, cache, last_only=False,
                                                                              taps=True)
    calls[f"prefill {prompt}"] = lambda: model.run_target([1] * prompt, model.new_target_cache(), last_only=True,
                                                          taps=True)
    out = {}
    for name, fn in calls.items():
        fn()  # warm
        runs = repeats if not name.startswith("prefill") else max(3, repeats // 3)
        out[name] = statistics.median(run_times(fn, runs)) * 1000
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="exported folders")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 2000])
    p.add_argument("--block", type=int, default=16, help="tokens per verify")
    p.add_argument("--prompt", type=int, default=512, help="prompt length for the prefill")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15, help="calls per measurement (a third for the prefill)")
    p.add_argument("--measure-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    settings = [str(x) for x in ("--contexts", *args.contexts, "--block", args.block, "--prompt", args.prompt,
                                 "--repeats", args.repeats)]
    if args.measure_one:
        print(json.dumps(measure(args.models[0], args.contexts, args.block, args.prompt, args.repeats)))
        return
    results = {m: [] for m in args.models}
    for r in range(args.rounds):
        for m in args.models:
            run = subprocess.run([sys.executable, __file__, m, *settings, "--measure-one"], check=True,
                                 capture_output=True, text=True)
            results[m].append(json.loads(run.stdout))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    names = list(results[args.models[0]][0])
    print("| call | " + " | ".join(args.models) + " |")
    print("|---|" + "---|" * len(args.models))
    for name in names:
        cells = [f"{statistics.median(r[name] for r in results[m]):.2f} ms" for m in args.models]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
