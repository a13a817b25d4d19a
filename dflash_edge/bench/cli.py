"""dflash-bench: DFlash against what users would run instead, on the same prompts, in one process.

For every prompt of every dataset, in turn: plain greedy decoding with the exported target (ORT, same
graph, no drafter), DFlash at each requested block size, DFlash with oracle drafts at each --oracle-tau
(the real drafter runs; its proposals are replaced so the mean acceptance is tau), and transformers
`generate` on the same weights when torch is installed. It checks that every DFlash output equals the plain
output, and reports decode and end-to-end tokens/s, time to first token, speed-ups, tau with its
histogram and peak memory, as JSON, a markdown table and a plot (speed-up against tau).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import UserError, run_cli
from ..jsonl import read_jsonl


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
    p.add_argument("--oracle-tau", type=float, nargs="*", default=[],
                   help="also run DFlash with oracle drafts at these mean acceptance lengths (1..block size)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers generate baseline")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--markdown", default=None, help="write the summary table here")
    p.add_argument("--plot", default=None, help="write the speed-up against tau plot here (PNG; needs matplotlib)")
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
    for n, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{n} needs a \"prompt\" string")
        prompts.append(row["prompt"])
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def calibrate(model, block: int, context: int = 256, repeats: int = 7) -> dict:
    """Cost of one verify of `block` tokens and of one draft, in single-token decode steps."""
    import numpy as np

    from ..runtime.model import DraftCache

    filler = 1  # any token: the cost does not depend on which
    cache = model.new_target_cache()
    _, taps, presents = model.run_target([filler] * context, 0, cache, last_only=True)
    cache.update(presents, context)
    draft_cache = DraftCache()
    draft_cache.append(model.project_context(taps, 0))

    def median_ms(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * float(np.median(times))

    step = median_ms(lambda: model.run_target([filler], context, cache, last_only=True))
    verify = median_ms(lambda: model.run_target([filler] * block, context, cache, last_only=False))
    draft = median_ms(lambda: (model.project_context(taps[:2], context),
                               model.draft(filler, context, block, draft_cache)))
    return {"context": context, "block": block, "step_ms": step, "verify_ms": verify, "draft_ms": draft,
            "verify_ratio": verify / step, "draft_ratio": draft / step}


def timed(fn) -> dict:
    from .report import peak_rss_mb, reset_peak_rss

    reset_peak_rss()
    run = fn()
    run["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    datasets = {name: load_dataset(name)[: args.limit] for name in args.dataset}
    from ..runtime.api import DFlashModel
    from ..runtime.generate import generate
    from .oracle import OracleDrafts
    from .report import machine_description, markdown, plot, summarize_mode

    dflash = DFlashModel(args.model, args.provider, threads=args.threads)
    model = dflash.model
    if not model.has_drafter:
        raise UserError(f"{args.model} has no drafter; export it with one (dflash-export --drafter ...)")
    blocks = [model.check_block_size(b) for b in (args.block_size or [None])]
    for t in args.oracle_tau:
        if not 1 <= t <= blocks[0]:
            raise UserError(f"--oracle-tau {t} is outside 1..{blocks[0]} (the block size)")
    if args.max_new_tokens >= model.max_context:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context ({model.max_context})")
    plain = DFlashModel(args.model, args.provider, threads=args.threads, use_drafter=False).model
    baseline = None
    if not args.no_transformers:
        try:
            from .baselines import TransformersBaseline
            baseline = TransformersBaseline(model.manifest["target"]["source"], args.threads, model.stop_token_ids)
        except ImportError:
            print("  transformers baseline skipped: torch/transformers are not installed", file=sys.stderr)
    vocab = int(model.target_info["vocab_size"])

    def run(m, ids, block, rewrite=None):
        out, stats = generate(m, ids, args.max_new_tokens, block, rewrite_drafts=rewrite)
        return {"tokens": out, **stats.as_dict()}

    # Warm every path up so the first prompt does not pay session initialisation.
    warm = dflash.prompt_ids("Hello")
    run(plain, warm, 1)
    run(model, warm, blocks[0])
    calibration = calibrate(model, blocks[0])
    print(f"  calibration: verify {blocks[0]} tokens = {calibration['verify_ratio']:.2f} steps, draft = "
          f"{calibration['draft_ratio']:.2f} steps (one step {calibration['step_ms']:.1f} ms)", file=sys.stderr)

    results, summary = {}, {}
    total = sum(len(p) for p in datasets.values())
    done, t0 = 0, time.perf_counter()
    for name, prompts in datasets.items():
        rows = []
        for n, prompt in enumerate(prompts):
            ids = dflash.prompt_ids(prompt)
            if len(ids) + args.max_new_tokens > model.max_context:
                print(f"  skipping a {len(ids)}-token prompt of {name}: it does not fit the context", file=sys.stderr)
                continue
            runs = {"plain": timed(lambda: run(plain, ids, 1))}
            reference = runs["plain"]["tokens"]
            for b in blocks:
                runs[f"dflash@{b}"] = timed(lambda: run(model, ids, b))
            for tau in args.oracle_tau:
                oracle = OracleDrafts(reference, tau, vocab, seed=n)
                runs[f"oracle{tau:g}@{blocks[0]}"] = timed(lambda: run(model, ids, blocks[0], oracle))
            if baseline is not None:
                runs["transformers"] = timed(lambda: baseline.generate(ids, args.max_new_tokens))
            rows.append({"prompt_tokens": len(ids), "runs": runs})
            done += 1
            eta = (time.perf_counter() - t0) / done * (total - done)
            taus = " ".join(f"tau@{b} {runs[f'dflash@{b}']['tau']:.2f}" for b in blocks)
            print(f"  [{done}/{total}] {name}: plain {runs['plain']['decode_tokens_per_s']:.1f} tok/s, {taus}, "
                  f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
        if not rows:
            raise UserError(f"no prompt of {name} fits the model's context")
        results[name] = rows
        summary[name] = {"prompts": len(rows), "modes": {m: summarize_mode(rows, m) for m in rows[0]["runs"]}}

    report = {"command": "dflash-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_description(), "model": str(args.model), "max_new_tokens": args.max_new_tokens,
              "threads": args.threads, "calibration": calibration,
              "transformers": baseline.version if baseline else None, "summary": summary, "prompts": results}
    table = markdown(report)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot and not plot(report, Path(args.plot)):
        print("  no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    mismatches = sum(s.get("mismatches", 0) for ds in summary.values() for m, s in ds["modes"].items()
                     if m != "transformers")
    if mismatches:
        print(f"error: DFlash output differed from plain decoding in {mismatches} runs", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
