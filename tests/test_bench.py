import importlib.util
import json
import shutil
import statistics
import subprocess
import sys

import pytest

from drafts import cost_tables


def bench(*args):
    return subprocess.run([sys.executable, "-m", "dflash_edge.bench.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_bench_runs_every_method_side_by_side_and_checks_exactness(tmp_path, tiny_llama):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello world", "the cat sat", "sort")))
    out = bench("--model", tiny_llama[2], "--dataset", prompts, "--limit", 2, "--max-new-tokens", 40,
                "--block-size", "auto", "auto-drafter", "auto-lookup", 16, 4, "--oracle-tau", 6.5,
                "--json", tmp_path / "new" / "r.json",
                "--markdown", tmp_path / "r.md", "--plot", tmp_path / "r.png")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "new" / "r.json").read_text())  # its folder made, not a crash at the end
    modes = report["summary"][str(prompts)]["modes"]
    assert report["summary"][str(prompts)]["prompts"] == 2
    optimum = ["optimum"] if importlib.util.find_spec("optimum") else []  # `make install` installs it
    auto = ("dflash@auto", "dflash@auto-drafter", "dflash@auto-lookup")
    assert set(modes) == {"plain", *auto, "dflash@16", "dflash@4", "oracle6.5@16", "transformers", *optimum}
    rows = report["prompts"][str(prompts)]
    assert sum(modes["dflash@auto"]["block_histogram"].values()) == sum(r["runs"]["dflash@auto"]["rounds"] for r in rows)
    for mode in (*auto, "dflash@16", "dflash@4", "oracle6.5@16"):
        assert modes[mode]["mismatches"] == 0
        assert sum(modes[mode]["acceptance_histogram"].values()) == sum(r["runs"][mode]["rounds"] for r in rows)
    # The oracle hits the asked acceptance (up to the rounds cut short by the end of the reply).
    assert 5.0 <= modes["oracle6.5@16"]["tau_pooled"] <= 6.6, modes["oracle6.5@16"]
    assert modes["dflash@16"]["tau_mean"] < 3  # a random drafter
    assert modes["dflash@auto-drafter"]["lookup_share"] == 0 == modes["dflash@16"]["lookup_share"]
    assert modes["dflash@auto-lookup"]["draft_share"] == 0  # the drafter never ran
    assert all(r["runs"]["plain"]["block_size"] == 1 for r in rows)
    # Peak memory in MB: above the weights the process loaded, and under 2 GB (the process, torch and the
    # baselines included, holds about 0.5 GB here): a count left in kB, or divided by 1024 once too often,
    # falls outside.
    weights_mb = sum(f.stat().st_size for f in tiny_llama[2].iterdir() if f.suffix in (".onnx", ".data")) / 2**20
    for mode, summary in modes.items():
        peaks = [r["runs"][mode]["peak_rss_mb"] for r in rows]
        assert all(weights_mb < peak < 2048 for peak in peaks), (mode, peaks, weights_mb)
        assert summary["peak_rss_mb"] == max(peaks)
    assert "speedup_vs_transformers" in modes["dflash@16"] and report["calibration"]["verify_ratio"] > 0
    table = (tmp_path / "r.md").read_text()
    assert "| oracle6.5@16 |" in table and "2/2" in table
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_a_folder_without_a_drafter_benches_prompt_lookup_against_plain(tmp_path, tiny_llama, monkeypatch, capsys):
    from dflash_edge.bench.cli import main
    from dflash_edge.runtime.model import ExportedModel

    folder = shutil.copytree(tiny_llama[2], tmp_path / "target-only")
    manifest = json.loads((folder / "dflash_edge.json").read_text())
    del manifest["drafter"]  # what dflash-export --no-drafter writes
    (folder / "dflash_edge.json").write_text(json.dumps(manifest))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "one two three one two three one two three one two"}) + "\n")
    # In this process, on fixed round costs: whether copied drafts pay does not hang on a start-up timing.
    monkeypatch.setattr(ExportedModel, "verify_costs", lambda self: cost_tables(self)[0])
    assert main(["--model", str(folder), "--dataset", str(prompts), "--max-new-tokens", "40", "--no-transformers",
                 "--no-optimum", "--json", str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    modes = report["summary"][str(prompts)]["modes"]
    assert set(modes) == {"plain", "dflash@auto"} and modes["dflash@auto"]["mismatches"] == 0
    run = report["prompts"][str(prompts)][0]["runs"]["dflash@auto"]
    assert run["lookup_tokens"] > run["lookup_rounds"] > 0, "no copied draft was kept"
    assert modes["dflash@auto"]["lookup_share"] == run["lookup_tokens"] / run["new_tokens"] > 0
    assert modes["dflash@auto"]["draft_share"] == 0
    assert report["calibration"]["draft_ratio"] == 0 and report["calibration"]["verify_ratio"] > 0
    for args, needle in ((("--oracle-tau", 4), "--oracle-tau runs the drafter"),
                         (("--block-size", "auto-drafter"), "needs a drafter"),
                         (("--block-size", 4), "has no drafter")):
        out = bench("--model", folder, "--dataset", prompts, "--max-new-tokens", 8, *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr


def test_repeats_rotate_the_methods_and_keep_each_ones_median_run(tmp_path, tiny_llama):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello world"}) + "\n")
    out = bench("--model", tiny_llama[2], "--dataset", prompts, "--max-new-tokens", 24, "--block-size", "auto", 4,
                "--oracle-tau", 2, 4, "--repeats", 3, "--no-transformers", "--no-optimum",
                "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    row = report["prompts"][str(prompts)][0]
    methods = ["plain", "dflash@auto", "dflash@4"]
    # Each repeat starts one method later; the oracle runs follow the plain reply and rotate among themselves.
    assert row["order"] == [methods + ["oracle2@16", "oracle4@16"],
                            methods[1:] + methods[:1] + ["oracle4@16", "oracle2@16"],
                            methods[2:] + methods[:2] + ["oracle2@16", "oracle4@16"]]
    assert list(row["runs"]) == methods + ["oracle2@16", "oracle4@16"]  # the table keeps its order
    for run in row["runs"].values():
        assert len(run["repeat_tok_s"]) == 3 and run["decode_tokens_per_s"] == sorted(run["repeat_tok_s"])[1]
    modes = report["summary"][str(prompts)]["modes"]
    # One prompt: each method's spread is its own repeats' (fastest - slowest) / median.
    for mode, summary in modes.items():
        speeds = row["runs"][mode]["repeat_tok_s"]
        assert min(speeds) > 0
        assert summary["repeat_spread"] == pytest.approx((max(speeds) - min(speeds)) / statistics.median(speeds))
    assert modes["dflash@4"]["mismatches"] == 0
    assert report["repeats"] == 3 and "median of 3 runs per prompt" in (tmp_path / "r.md").read_text()


def test_bench_refuses_bad_input_in_one_line(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hello"}\n')
    for args, needle in (((tiny_llama[2], "--dataset", bad), "needs a \"prompt\""),
                         ((tiny_llama[2], "--dataset", tmp_path / "missing.jsonl"), "not humaneval"),
                         ((tiny_llama[2], "--max-new-tokens", 0), "at least 1"),
                         ((tiny_llama[2], "--repeats", 0), "--repeats must be at least 1"),
                         ((tiny_llama[2], "--block-size", "big"), "numbers, 'auto', 'auto-drafter', 'auto-lookup'"),
                         ((tmp_path, "--dataset", good), str(tmp_path))):
        out = bench("--model", *args)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr


def test_a_reply_that_differs_from_plain_in_any_repeat_is_a_mismatch():
    from dflash_edge.bench.cli import median_runs
    from dflash_edge.bench.report import summarize_mode

    def repeat(speed, tokens):
        run = {"decode_tokens_per_s": speed, "tokens": tokens, "new_tokens": 2, "ttft_s": 0.1, "decode_s": 1.0}
        return {"plain": {**run, "tokens": [1, 2]}, "dflash@4": run}
    # The differing repeat is the fastest, not the median one: only the "any repeat" rule can catch it.
    runs = median_runs([repeat(30.0, [1, 3]), repeat(10.0, [1, 2]), repeat(20.0, [1, 2])])
    assert runs["dflash@4"]["decode_tokens_per_s"] == 20.0 and runs["dflash@4"]["repeat_tok_s"] == [30.0, 10.0, 20.0]
    assert summarize_mode([{"runs": runs}], "dflash@4")["mismatches"] == 1
    runs = median_runs([repeat(30.0, [1, 2]), repeat(10.0, [1, 2])])  # even count: the lower middle one
    assert runs["dflash@4"]["decode_tokens_per_s"] == 10.0
    assert summarize_mode([{"runs": runs}], "dflash@4")["mismatches"] == 0
