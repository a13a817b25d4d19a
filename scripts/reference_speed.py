"""Time the reference `dflash` package's PyTorch loop on the prompts dflash-bench uses, for BENCHMARKS.md.

The reference pins transformers 5.15, so this runs in the parity environment (`bash scripts/parity.sh`
creates it), right before or after dflash-bench on the same machine:

    .venv-ref/bin/python scripts/reference_speed.py --drafter dflash_edge/drafters/smollm2-135m \
        --dataset humaneval --limit 8 --block-size 16 --json runs/reference.json

Same target weights (the SmolLM2 GGUF, read by transformers), same drafter checkpoint, same chat
template, greedy, CPU fp32. Per prompt: `dflash_generate` at the block size and at block 1 (its plain
loop), decode tokens/s counted as dflash-bench counts them ((tokens - 1) / time after the first token).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dflash.model as ref  # noqa: E402

from dflash_edge.evalsets import load_prompts  # noqa: E402
from dflash_edge.export.pipeline import derive_chat, stop_ids  # noqa: E402
from dflash_edge.export.sources import load_hf, resolve_model  # noqa: E402
from dflash_edge.runtime.chat import render_chat  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, Hugging Face folder or .gguf")
    p.add_argument("--drafter", required=True)
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref._cuda_time = time.perf_counter  # its timer calls torch.cuda.synchronize, which a CPU torch refuses

    target, tokenizer, family = load_hf(resolve_model(args.model), log=lambda *a: None)
    target = target.float().eval()
    chat = derive_chat(tokenizer, family, lambda *a: None)
    stops = stop_ids(target, tokenizer, chat)

    def prompt_ids(text):  # as the runtime builds them: the exported chat template, no extra specials
        return tokenizer(render_chat(chat, [("user", text)]), add_special_tokens=False).input_ids
    drafter = ref.DFlashDraftModel.from_pretrained(args.drafter, dtype=torch.float32).eval()

    def run(ids, block):
        with torch.no_grad():
            res = ref.dflash_generate(drafter, target, torch.tensor([ids]), args.max_new_tokens, stops,
                                      temperature=0.0, block_size=block, return_stats=True)
        n = res.num_output_tokens
        decode_s = res.time_per_output_token * n
        return {"tokens": res.output_ids[0, len(ids):].tolist(), "new_tokens": n,
                "decode_tokens_per_s": (n - 1) / decode_s if n > 1 else 0.0,
                "tau": statistics.mean(res.acceptance_lengths) if res.acceptance_lengths else 0.0}

    prompts = load_prompts(args.dataset)[: args.limit]
    run(prompt_ids("Hello"), args.block_size)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(prompt)
        row = {"prompt_tokens": len(ids), "dflash": run(ids, args.block_size), "plain": run(ids, 1)}
        rows.append(row)
        print(f"  [{i + 1}/{len(prompts)}] reference dflash@{args.block_size} "
              f"{row['dflash']['decode_tokens_per_s']:.1f} tok/s (tau {row['dflash']['tau']:.2f}), "
              f"plain loop {row['plain']['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    summary = {mode: {"decode_tok_s": statistics.median(r[mode]["decode_tokens_per_s"] for r in rows),
                      "tau_mean": statistics.mean(r[mode]["tau"] for r in rows)} for mode in ("dflash", "plain")}
    report = {"command": " ".join(sys.argv), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "threads": torch.get_num_threads(),
              "block_size": args.block_size, "summary": summary, "prompts": rows}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
