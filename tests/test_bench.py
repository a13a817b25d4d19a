import importlib.util
import json
import subprocess
import sys


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
    assert all(r["runs"]["plain"]["block_size"] == 1 and r["runs"]["plain"]["peak_rss_mb"] > 0 for r in rows)
    assert "speedup_vs_transformers" in modes["dflash@16"] and report["calibration"]["verify_ratio"] > 0
    table = (tmp_path / "r.md").read_text()
    assert "| oracle6.5@16 |" in table and "2/2" in table
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_refuses_bad_input_in_one_line(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hello"}\n')
    for args, needle in (((tiny_llama[2], "--dataset", bad), "needs a \"prompt\""),
                         ((tiny_llama[2], "--dataset", tmp_path / "missing.jsonl"), "not humaneval"),
                         ((tiny_llama[2], "--max-new-tokens", 0), "at least 1"),
                         ((tiny_llama[2], "--block-size", "big"), "numbers, 'auto', 'auto-drafter', 'auto-lookup'"),
                         ((tmp_path, "--dataset", good), str(tmp_path))):
        out = bench("--model", *args)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr
