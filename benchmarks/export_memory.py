"""Peak memory, time and size of dflash-export at 135M, 1B and 8B shapes (BENCHMARKS.md, "Export memory").

Writes random Llama checkpoints tensor by tensor (bf16 safetensors, a tokenizer of the shape's vocabulary)
under --work, exports each with the options below in a child process under /usr/bin/time -v (its
maximum resident set size is the export's peak), generates a few tokens from the 8B int4 folder, and
checks that peak memory does not grow with depth (4 and 16 layers of the 8B width). The checkpoints
(16 GB for the 8B shape) stay under --work, outside the repository.

    python benchmarks/export_memory.py --work /tmp/dflash-export-memory [--only 8b] [--label "int4 + drafter"] [--keep]
Results: one JSON line per run in benchmarks/export_memory.jsonl, and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dflash_edge.bench.synthetic import LLAMA31_8B, write_checkpoint, write_drafter_checkpoint  # noqa: E402
from dflash_edge.machine import cpu_name  # noqa: E402

SHAPES = {
    # SmolLM2-135M's shapes (tied), the 1.07 B Llama of issue 26, Llama-3.1-8B's (untied, 128k vocab).
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "1b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b": {**{k: v for k, v in LLAMA31_8B.items() if k != "max_position_embeddings"}, "tie_word_embeddings": False},
}
RUNS = [  # (shape, label, dflash-export options)
    ("135m", "fp32", []),
    ("135m", "int4", ["--quantize", "int4"]),
    ("1b", "fp16", ["--dtype", "fp16"]),
    ("1b", "int4", ["--quantize", "int4"]),
    ("8b", "int4", ["--quantize", "int4"]),
    ("8b", "tensorrt fp16", ["--variant", "tensorrt", "--dtype", "fp16"]),
    ("8b", "jetson-orin", ["--device", "jetson-orin"]),
    ("8b", "bf16", ["--dtype", "bf16"]),
    # With a drafter of z-lab's shape for this target (5 layers of its width, 1.1 B parameters), streamed too.
    ("8b", "int4 + drafter", ["--quantize", "int4", "--drafter", "DRAFTER"]),
]
DEPTHS = (4, 16)  # layers of the 8B width, fp16: the growth of peak memory with depth


def timed(cmd: list[str]) -> dict:
    """Run cmd under /usr/bin/time -v: its peak RSS (GB), wall time (s), exit status and last lines."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"peak_rss_gb": round(int(peak.group(1)) * 1024 / 1e9, 2) if peak else None,
            "seconds": round(wall, 1), "rc": proc.returncode,
            "tail": (proc.stdout + proc.stderr).strip().splitlines()[-25:]}


def folder_gb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9, 2)


def checkpoint(work: Path, name: str, shape: dict) -> Path:
    folder = work / f"checkpoint-{name}"
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_checkpoint(folder, shape)
        print(f"wrote {folder} ({folder_gb(folder)} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    return folder


def drafter(work: Path, name: str, target: Path) -> Path:
    folder = work / f"drafter-{name}"
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_drafter_checkpoint(folder, target, layers=5)
        print(f"wrote {folder} ({folder_gb(folder)} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    return folder


def export(work: Path, folder: Path, name: str, options: list[str]) -> tuple[dict, Path]:
    out = work / f"export-{name}"
    result = timed([str(Path(sys.executable).parent / "dflash-export"), "--model", str(folder), "--output", str(out),
                    "--force", *options])
    if result["rc"] == 0:
        manifest = json.loads((out / "dflash_edge.json").read_text())
        result["output_gb"] = folder_gb(out)
        result["validated"] = manifest["export"].get("validated")
        result["checks"] = sum(1 for v in manifest["export"]["validation"].values() if v["ok"])
    return result, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/dflash-export-memory"))
    p.add_argument("--only", choices=list(SHAPES), action="append", help="shapes to run (default: all)")
    p.add_argument("--label", action="append", help="runs to do, by their label (default: all)")
    p.add_argument("--no-depth", action="store_true", help="skip the 4-vs-16-layer runs")
    p.add_argument("--keep", action="store_true", help="keep the exported folders")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "export_memory.jsonl")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    stamp = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": cpu_name()}
    rows = []

    def record(row: dict) -> None:
        row = {**row, **stamp}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
        if row.get("rc"):
            print("\n".join(row["tail"]), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if k != "tail"}) + "\n")

    for shape_name, label, options in RUNS:
        if (args.only and shape_name not in args.only) or (args.label and label not in args.label):
            continue
        folder = checkpoint(args.work, shape_name, SHAPES[shape_name])
        if "DRAFTER" in options:
            options = [str(drafter(args.work, shape_name, folder)) if o == "DRAFTER" else o for o in options]
        name = f"{shape_name}-{label.replace(' ', '-').replace('+', 'and')}"
        result, out = export(args.work, folder, name, options)
        record({"shape": shape_name, "export": label, "options": " ".join(options), **result})
        if result["rc"] == 0 and shape_name == "8b" and label.startswith("int4"):
            gen = timed([str(Path(sys.executable).parent / "dflash-generate"), "--model", str(out), "--raw",
                         "--max-new-tokens", "8", "--json", "the cat sat on the mat"])
            record({"shape": shape_name, "export": f"{label}: generate 8 tokens", "options": "dflash-generate", **gen})
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if not args.no_depth and (not args.only or "8b" in args.only):
        for layers in DEPTHS:
            shape = {**SHAPES["8b"], "num_hidden_layers": layers}
            folder = checkpoint(args.work, f"8b-width-{layers}-layers", shape)
            result, out = export(args.work, folder, f"depth-{layers}", ["--dtype", "fp16"])
            record({"shape": f"8b width, {layers} layers", "export": "fp16", "options": "--dtype fp16", **result})
            shutil.rmtree(out, ignore_errors=True)
    print("\n| shape | export | peak RSS (GB) | time (s) | output (GB) | validated |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['export']} | {r['peak_rss_gb']} | {r['seconds']} | {r.get('output_gb', '')} | "
              f"{r.get('validated') or ('exit ' + str(r['rc']) if r['rc'] else '')} |")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
