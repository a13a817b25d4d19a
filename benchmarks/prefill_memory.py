"""Peak and steady RSS around one long prompt, prefilled whole or in pieces (BENCHMARKS.md section 12).

    python benchmarks/prefill_memory.py FOLDER [--tokens 8000] [--chunk 512 0]
Each setting runs in its own process: RSS after loading, the peak during an N-token prompt (8 new
tokens), the RSS after it, and after a short prompt that follows (the steady state a server stays at).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(folder: str, tokens: int, chunk: int) -> dict:
    from dflash_edge.runtime.generate import generate
    from dflash_edge.runtime.model import ExportedModel

    model = ExportedModel(folder, load_drafter=False)
    model.prefill_chunk = chunk or None
    loaded = rss_mb()
    words = ("the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat " * 2000).split()
    ids = model.tokenizer.encode(" ".join(words))[:tokens]
    generate(model, ids, 8, block_size=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after = rss_mb()
    generate(model, model.tokenizer.encode("hello there"), 8, block_size=1)
    return {"chunk": chunk or "whole", "prompt_tokens": len(ids), "loaded_mb": round(loaded), "peak_mb": round(peak),
            "after_long_mb": round(after), "after_short_mb": round(rss_mb())}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--chunk", type=int, nargs="+", default=[512, 0])
    p.add_argument("--child", type=int, default=None)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.folder, a.tokens, a.child)))
        return 0
    for chunk in a.chunk:
        out = subprocess.run([sys.executable, __file__, a.folder, "--tokens", str(a.tokens), "--child", str(chunk)],
                             capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-800:], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
