"""Benchmark results: per-dataset summaries, the markdown table, the plot, and the machine they came from."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

BASELINES = ("transformers", "optimum")  # other tools: their output is not held to plain decoding's


def _ratio(a: float, b: float) -> float | None:
    return a / b if a and b else None


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """The index of the first token where `tokens` leaves `reference` (where the shorter one ends, when one
    is a prefix of the other); None when the two are identical."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def agreement(divergences: list[int | None]) -> dict:
    """Per-prompt first divergences from plain decoding (None: identical) -> the share of identical replies,
    and where the others first left plain decoding's reply (token index, median and earliest)."""
    diverging = [d for d in divergences if d is not None]
    return {"identical": (len(divergences) - len(diverging)) / max(1, len(divergences)),
            "first_divergence": divergences,
            "median_first_divergence": statistics.median(diverging) if diverging else None,
            "earliest_divergence": min(diverging) if diverging else None}


def summarize_mode(rows: list[dict], mode: str) -> dict:
    runs = [r["runs"][mode] for r in rows]
    plain = [r["runs"]["plain"] for r in rows]
    s = {
        "decode_tok_s": statistics.median(run["decode_tokens_per_s"] for run in runs),
        "e2e_tok_s": statistics.median(run["new_tokens"] / max(1e-9, run["ttft_s"] + run["decode_s"])
                                       for run in runs),
        "ttft_ms": 1000 * statistics.median(run["ttft_s"] for run in runs),
        "peak_rss_mb": max(run.get("peak_rss_mb", 0) for run in runs),
    }
    # (fastest - slowest) / median of each prompt's repeats, the median over the prompts
    spreads = [(max(t) - min(t)) / statistics.median(t) for t in (run.get("repeat_tok_s", []) for run in runs)
               if len(t) > 1 and statistics.median(t) > 0]
    if spreads:
        s["repeat_spread"] = statistics.median(spreads)
    if mode != "plain":
        ratios = [_ratio(run["decode_tokens_per_s"], p["decode_tokens_per_s"]) for run, p in zip(runs, plain)]
        s["speedup_vs_plain"] = statistics.median(x for x in ratios if x) if any(ratios) else None
        s["speedup_vs_plain_total_time"] = _ratio(sum(p["decode_s"] for p in plain), sum(r["decode_s"] for r in runs))
    if "transformers" in rows[0]["runs"] and mode != "transformers":
        ratios = [_ratio(run["decode_tokens_per_s"], r["runs"]["transformers"]["decode_tokens_per_s"])
                  for run, r in zip(runs, rows)]
        s["speedup_vs_transformers"] = statistics.median(x for x in ratios if x) if any(ratios) else None
    if "rounds" in runs[0] and runs[0].get("block_size", 1) != 1:
        hist: dict[str, int] = {}
        blocks: dict[str, int] = {}
        for run in runs:
            for k, v in run["acceptance_histogram"].items():
                hist[k] = hist.get(k, 0) + v
            for k, v in run.get("block_histogram", {}).items():
                blocks[k] = blocks.get(k, 0) + v
        if blocks:
            s["block_histogram"] = dict(sorted(blocks.items(), key=lambda kv: int(kv[0])))
        s["tau_mean"] = statistics.mean(run["tau"] for run in runs)
        s["tau_pooled"] = sum(int(k) * v for k, v in hist.items()) / max(1, sum(hist.values()))
        s["acceptance_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        s["draft_share"] = sum(r["draft_s"] for r in runs) / max(1e-9, sum(r["decode_s"] for r in runs))
        s["verify_share"] = sum(r["verify_s"] for r in runs) / max(1e-9, sum(r["decode_s"] for r in runs))
        # Share of the reply's tokens that came from rounds verifying prompt-lookup drafts.
        s["lookup_share"] = sum(r.get("lookup_tokens", 0) for r in runs) / max(1, sum(r["new_tokens"] for r in runs))
    if mode != "plain":
        # median_runs records each reply's earliest divergence over the repeats; a bare run is compared here.
        divergences = [run["first_divergence"] if "first_divergence" in run else
                       first_divergence(run["tokens"], p["tokens"]) for run, p in zip(runs, plain)]
        s["mismatches"] = sum(d is not None for d in divergences)
        s["agreement"] = agreement(divergences)
    return s


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}", "", f"Command: `{report['command']}`", ""]
    cal = report.get("calibration")
    if cal:
        lines += [f"Cost of one round in single-token target steps (context {cal['context']}): verify "
                  f"{cal['block']} tokens {cal['verify_ratio']:.2f}, draft {cal['draft_ratio']:.2f}; the start-up "
                  f"estimate at acceptance tau is tau / {cal['verify_ratio'] + cal['draft_ratio']:.2f} (an "
                  f"estimate from start-up timings, not a ceiling: measured runs can exceed it).", ""]
        growth = cal.get("context_growth", {})
        if growth.get("growth") is not None:
            steps = growth["step_ms"]
            lines += [f"Plain decode step: {steps['100']} ms at 100 tokens of context, {steps['2000']} ms at "
                      f"2000 (+{growth['growth']:.0%}).", ""]
    lines += ["| dataset | prompts | method | decode tok/s | end-to-end tok/s | TTFT ms | vs plain | "
              "vs transformers | tau | exact | from lookup |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for name, ds in report["summary"].items():
        for mode, s in ds["modes"].items():
            exact = "-" if "mismatches" not in s or mode in BASELINES else f"{ds['prompts'] - s['mismatches']}/{ds['prompts']}"
            first = (s.get("agreement") or {}).get("median_first_divergence")
            if exact != "-" and first is not None:
                exact += f" (diverged at token {first:g}, median)"
            vs_plain = fmt(s.get("speedup_vs_plain"), ".2f") + ("x" if s.get("speedup_vs_plain") else "")
            vs_hf = fmt(s.get("speedup_vs_transformers"), ".2f") + ("x" if s.get("speedup_vs_transformers") else "")
            lookup = f"{s['lookup_share']:.0%}" if s.get("lookup_share") else "-"
            lines.append(f"| {name} | {ds['prompts']} | {mode} | {s['decode_tok_s']:.1f} | {s['e2e_tok_s']:.1f} | "
                         f"{s['ttft_ms']:.0f} | {vs_plain} | {vs_hf} | {fmt(s.get('tau_mean'), '.2f')} | {exact} | "
                         f"{lookup} |")
    if report.get("exactness") == "reported":
        lines += ["", f"exact: replies identical to plain decoding's. On {report.get('provider')} this is reported, not "
                      "enforced: every token is still the target's greedy choice given the prefix as the verify "
                      "computed it, but a verify's rows may differ from single-token calls in the last bits."]
    if report.get("repeats", 1) > 1:
        spreads = "; ".join(f"{name}: " + ", ".join(f"{mode} {s['repeat_spread']:.0%}"
                                                    for mode, s in ds["modes"].items() if "repeat_spread" in s)
                            for name, ds in report["summary"].items())
        lines += ["", f"Each row is each method's median of {report['repeats']} runs per prompt, in rotating order. "
                      f"Spread between a prompt's runs ((fastest - slowest) / median, median over the prompts): "
                      f"{spreads}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Speed-up over plain decoding against tau: one point per prompt and method, the start-up
    estimate tau / (verify + draft) as a line.
    Returns False when matplotlib is not installed (pip install dflash-edge[bench])."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in report["prompts"].items():
        for mode in rows[0]["runs"]:
            if mode == "plain" or mode in BASELINES:
                continue
            xs = [r["runs"][mode]["tau"] for r in rows]
            ys = [_ratio(r["runs"][mode]["decode_tokens_per_s"], r["runs"]["plain"]["decode_tokens_per_s"]) or 0
                  for r in rows]
            ax.scatter(xs, ys, s=14, label=f"{name} {mode}")
    cal = report.get("calibration")
    if cal:
        taus = [run["tau"] for rows in report["prompts"].values() for r in rows for run in r["runs"].values()
                if "tau" in run]
        top = max([2.0, *taus])
        xs = [1 + i * (top - 1) / 50 for i in range(51)]
        ax.plot(xs, [x / (cal["verify_ratio"] + cal["draft_ratio"]) for x in xs], "k--", lw=1,
                label="start-up estimate: tau / (verify + draft cost)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("tau (tokens per verify round)")
    ax.set_ylabel("decode speed-up over plain ORT decoding")
    ax.set_title(report["model"], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine_description() -> str:
    import onnxruntime

    from ..machine import cpu_name
    return (f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")


def reset_peak_rss() -> None:
    """Linux: restart the VmHWM (peak resident set) count, so each method's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
