"""The GPU benchmark script cannot rot: its dry mode (tiny random models, CPU) runs every step in CI."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_dry_run_checks_exactness_and_prints_the_table_last(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                         timeout=600, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OUT": str(tmp_path),
                                           "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    lines = run.stdout.strip().splitlines()
    title = max(i for i, line in enumerate(lines) if line.startswith("GPU benchmark ("))
    assert lines[title] == "GPU benchmark (tiny, 4 layers, fp32, provider cpu, GPU no NVIDIA GPU)"
    assert lines[title + 2].startswith("| model | mode | plain tok/s | DFlash tok/s | speed-up | tau | ideal |")
    assert len(lines) == title + 9 and all(line.startswith("|") for line in lines[title + 2:])  # the table is last
    result = json.loads((tmp_path / "gpu.json").read_text())
    modes = {(r["model"], r["mode"]) for r in result["rows"]}
    assert {("small", "dflash@auto"), ("small", "dflash@auto-drafter"), ("small", "dflash@16"),
            ("llama", "oracle6.5@16")} <= modes
    assert all(r["mismatches"] == 0 for r in result["rows"])
    oracle = next(r for r in result["rows"] if r["mode"] == "oracle6.5@16")
    assert oracle["tau"] > 4 and "overhead" in oracle and oracle["ideal_speedup"] > 1
    # The CUDA graph and TensorRT probes ran and, without those providers, say why they measured nothing.
    probe = json.loads((tmp_path / "cuda_graph.json").read_text())
    assert probe["captured"] is False and "not available" in probe["error"]
    assert json.loads((tmp_path / "tensorrt.json").read_text()) == {
        "available": False, "why": "TensorrtExecutionProvider is not available in this onnxruntime"}
