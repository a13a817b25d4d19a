"""The GPU training recipe cannot rot: its dry mode (tiny sizes, CPU) runs end to end in CI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smollm2
ROOT = Path(__file__).resolve().parent.parent


def test_gpu_recipe_dry_run_writes_a_checkpoint(tmp_path):
    out = tmp_path / "drafter"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_recipe.sh"), "--dry-run", str(out)],
                         capture_output=True, text=True, timeout=900, env={"PYTHON": sys.executable,
                                                                          "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 16
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 4 and report["sequences"] > 0
