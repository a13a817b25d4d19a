"""Target-graph call costs of several exports side by side: a decode step and a verify at two context
lengths, and a prompt's prefill.

    python benchmarks/graph_costs.py exports/old exports/new [--contexts 256 2000] [--block 16]
        [--prompt 512] [--rounds 5] [--repeats 9]

For comparing two builds of one model's graph. The exports take turns call by call, round after round, so
a shared machine's changes of speed fall on all of them alike; the table gives the median over rounds of
each round's median, in milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_edge.runtime.model import ExportedModel  # noqa: E402
from dflash_edge.runtime.policy import filled_cache, run_times  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="exported folders")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 2000])
    p.add_argument("--block", type=int, default=16, help="tokens per verify")
    p.add_argument("--prompt", type=int, default=512, help="prompt length for the prefill")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=9, help="calls per measurement in a round")
    args = p.parse_args()

    models = {m: ExportedModel(m) for m in args.models}
    caches = {(m, c): filled_cache(model, c)[0] for m, model in models.items() for c in args.contexts}
    calls = {}
    for m, model in models.items():
        for c in args.contexts:
            cache = caches[m, c]
            calls[m, f"step @ {c}"] = lambda model=model, cache=cache: model.run_target([1], cache, last_only=True)
            calls[m, f"verify {args.block} @ {c}"] = lambda model=model, cache=cache: model.run_target(
                [1] * args.block, cache, last_only=False, taps=True)
        calls[m, f"prefill {args.prompt}"] = lambda model=model: model.run_target(
            [1] * args.prompt, model.new_target_cache(), last_only=True, taps=True)
    rounds = {key: [] for key in calls}
    for r in range(args.rounds):
        for key, fn in calls.items():
            fn()  # warm
            rounds[key].append(statistics.median(run_times(fn, args.repeats)) * 1000)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    names = list(dict.fromkeys(name for _, name in calls))
    print("| call | " + " | ".join(args.models) + " |")
    print("|---|" + "---|" * len(args.models))
    for name in names:
        cells = [f"{statistics.median(rounds[m, name]):.2f} ms" for m in args.models]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
