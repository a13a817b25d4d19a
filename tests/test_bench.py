import json
import subprocess
import sys


def bench(*args):
    return subprocess.run([sys.executable, "-m", "dflash_edge.bench.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_bench_runs_plain_and_dflash_side_by_side_and_checks_exactness(tmp_path, tiny_llama):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello world", "the cat sat", "sort")))
    out = bench("--model", tiny_llama[2], "--dataset", prompts, "--limit", 2, "--max-new-tokens", 24,
                "--block-size", 4, 16, "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    summary = report["summary"][str(prompts)]
    assert summary["prompts"] == 2
    for b in (4, 16):
        s = summary[f"block_{b}"]
        assert s["mismatches"] == 0
        assert 1.0 <= s["tau_mean"] <= b
        assert sum(s["acceptance_histogram"].values()) == sum(
            row[f"dflash_{b}"]["rounds"] for row in report["prompts"][str(prompts)])
    row = report["prompts"][str(prompts)][0]
    assert row["plain"]["tokens"] == row["dflash_16"]["tokens"] and row["plain"]["block_size"] == 1
    table = (tmp_path / "r.md").read_text()
    assert "| 16 |" in table and "2/2" in table


def test_bench_refuses_bad_input_in_one_line(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hello"}\n')
    for args, needle in (((tiny_llama[2], "--dataset", bad), "needs a \"prompt\""),
                         ((tiny_llama[2], "--dataset", tmp_path / "missing.jsonl"), "not humaneval"),
                         ((tiny_llama[2], "--max-new-tokens", 0), "at least 1"),
                         ((tmp_path, "--dataset", good), str(tmp_path))):
        out = bench("--model", *args)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr
