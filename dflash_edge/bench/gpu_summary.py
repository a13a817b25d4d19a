"""The GPU benchmark's last word (benchmarks/gpu.sh): one short table from its dflash-bench reports.

For every DFlash mode: median decode tokens/s against plain decoding on the same graph and provider,
tau, and the runtime's overhead against the ideal speed-up tau / (verify + draft), where verify and draft
are the round's costs in plain decode steps measured at start-up for the trained block size. The
per-round block choice mixes block sizes, so it has no single ideal.

The exact column: whether every reply equalled plain decoding's. A difference fails the run (exit status 1)
where the report enforced exactness (the CPU provider, the dry run); on CUDA and TensorRT it is a figure:
replies identical / prompts, and the median token index of the first divergence.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(report: dict) -> list[dict]:
    cal = report["calibration"]
    block = cal["block"]
    enforced = report.get("exactness", "enforced") == "enforced"  # reports from before the field: the CPU rule
    out = []
    for dataset, summary in report["summary"].items():
        modes = summary["modes"]
        plain = modes["plain"]["decode_tok_s"]
        for mode, s in modes.items():
            if mode == "plain":
                continue
            row = {"model": Path(report["model"]).parent.name, "dataset": dataset, "mode": mode,
                   "plain_tok_s": plain, "dflash_tok_s": s["decode_tok_s"], "speedup": s.get("speedup_vs_plain"),
                   "tau": s.get("tau_mean"), "mismatches": s.get("mismatches", 0), "prompts": summary["prompts"],
                   "exact_enforced": enforced, "agreement": s.get("agreement")}
            if mode.endswith(f"@{block}") and row["tau"] and row["speedup"]:
                ideal = row["tau"] / (cal["verify_ratio"] + cal["draft_ratio"])
                row["ideal_speedup"] = ideal
                row["overhead"] = 1 - row["speedup"] / ideal
            out.append(row)
    return out


def exact(row: dict) -> str:
    if row["mismatches"] == 0:
        return "yes"
    if row.get("exact_enforced", True):
        return "NO"
    first = (row.get("agreement") or {}).get("median_first_divergence")
    where = f", from token {first:g}" if first is not None else ""
    return f"{row['prompts'] - row['mismatches']}/{row['prompts']} identical{where} (reported)"


def failed(row: dict) -> bool:
    """A difference from plain decoding where exactness is enforced."""
    return row["mismatches"] > 0 and row.get("exact_enforced", True)


def table(all_rows: list[dict], note: str) -> str:
    lines = [f"GPU benchmark ({note})", "",
             "| model | mode | plain tok/s | DFlash tok/s | speed-up | tau | ideal | overhead | exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in all_rows:
        ideal = f"{r['ideal_speedup']:.2f}x" if "ideal_speedup" in r else "-"
        overhead = f"{r['overhead']:.0%}" if "overhead" in r else "-"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['plain_tok_s']:.1f} | {r['dflash_tok_s']:.1f} | {speedup} | "
                     f"{tau} | {ideal} | {overhead} | {exact(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash_edge.bench.gpu_summary", description=__doc__)
    p.add_argument("reports", nargs="+", help="dflash-bench --json files")
    p.add_argument("--json", required=True, help="write the combined results here")
    p.add_argument("--note", default="", help="what ran: shapes, dtype, provider")
    args = p.parse_args(argv)
    reports = [json.loads(Path(r).read_text()) for r in args.reports]
    all_rows = [row for report in reports for row in rows(report)]
    combined = {"note": args.note, "machine": reports[0]["machine"], "rows": all_rows,
                "calibration": {Path(r["model"]).parent.name: r["calibration"] for r in reports}}
    Path(args.json).write_text(json.dumps(combined, indent=1) + "\n")
    print(table(all_rows, args.note))
    return 1 if any(failed(r) for r in all_rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
