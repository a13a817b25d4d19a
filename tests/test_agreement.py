"""dflash-bench's agreement with plain decoding: where a reply first differs, and when that fails the run
(the CPU provider) or is only reported (CUDA and TensorRT, whose verify rows may differ from single-token
calls in the last bits). And the calibration's filled caches go through prefill's pieces (TensorRT's
profiles bound a call's length)."""
import json

import pytest

from dflash_edge.bench import cli, gpu_summary
from dflash_edge.bench.report import agreement, first_divergence, summarize_mode


def test_first_divergence_is_the_index_of_the_first_differing_token():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert first_divergence([5, 2, 3], [1, 2, 3]) == 0
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early: they differ where it ended
    assert first_divergence([1, 2, 3, 4], [1, 2, 3]) == 3
    assert agreement([None, 4, None, 10, 7]) == {"identical": 0.4, "first_divergence": [None, 4, None, 10, 7],
                                                 "median_first_divergence": 7, "earliest_divergence": 4}
    assert agreement([None, None])["median_first_divergence"] is None and agreement([None])["identical"] == 1.0


def test_repeats_keep_the_earliest_divergence_and_the_summary_aggregates_it():
    def repeat(speed, tokens):
        run = {"decode_tokens_per_s": speed, "tokens": tokens, "new_tokens": 4, "ttft_s": 0.1, "decode_s": 1.0}
        return {"plain": {**run, "tokens": [1, 2, 3, 4]}, "dflash@4": run}
    runs = cli.median_runs([repeat(30.0, [1, 2, 3, 4]), repeat(10.0, [1, 2, 9, 4]), repeat(20.0, [1, 7, 3, 4])])
    assert runs["dflash@4"]["first_divergence"] == 1 and "first_divergence" not in runs["plain"]
    same = cli.median_runs([repeat(30.0, [1, 2, 3, 4])])
    assert same["dflash@4"]["first_divergence"] is None
    s = summarize_mode([{"runs": runs}, {"runs": same}], "dflash@4")
    assert s["mismatches"] == 1
    assert s["agreement"] == {"identical": 0.5, "first_divergence": [1, None], "median_first_divergence": 1,
                              "earliest_divergence": 1}


@pytest.fixture
def wrong_token_at(monkeypatch):
    """Make every DFlash generation (block size other than 1) emit a different token at position k."""
    import dflash_edge.runtime.generate as gen
    real = gen.generate

    def inject(k):
        def generate(model, ids, max_new_tokens, block=None, **kwargs):
            out, stats = real(model, ids, max_new_tokens, block, **kwargs)
            if block != 1 and len(out) > k:
                out = list(out)
                out[k] = (out[k] + 1) % int(model.target_info["vocab_size"])
            return out, stats
        monkeypatch.setattr(gen, "generate", generate)
    # The 31 timed steps at 2,000 tokens of context are not what these tests are about.
    monkeypatch.setattr(cli, "context_growth", lambda model: {"step_ms": {}, "growth": None})
    return inject


def run_bench(tmp_path, folder, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello world"}) + "\n")
    status = cli.main(["--model", str(folder), "--dataset", str(prompts), "--max-new-tokens", "16",
                       "--block-size", "4", "--no-transformers", "--no-optimum", "--json", str(tmp_path / "r.json"),
                       "--markdown", str(tmp_path / "r.md")])
    report = json.loads((tmp_path / "r.json").read_text())
    return status, capsys.readouterr().err, report, report["summary"][str(prompts)]["modes"]["dflash@4"]


def test_on_the_cpu_provider_a_divergence_fails_and_says_where(tmp_path, tiny_llama, wrong_token_at, capsys):
    wrong_token_at(5)
    status, err, report, mode = run_bench(tmp_path, tiny_llama[2], capsys)
    assert len(next(iter(report["prompts"].values()))[0]["runs"]["plain"]["tokens"]) > 5
    assert report["provider"] == "CPUExecutionProvider" and report["exactness"] == "enforced"
    assert status == 1
    assert "error: DFlash output differed from plain decoding in 1 runs: dflash@4" in err and "from token 5" in err
    assert mode["mismatches"] == 1 and mode["agreement"]["first_divergence"] == [5]
    assert mode["agreement"]["identical"] == 0.0 and mode["agreement"]["median_first_divergence"] == 5
    assert "0/1 (diverged at token 5, median)" in (tmp_path / "r.md").read_text()


def test_on_a_gpu_provider_a_divergence_is_reported_not_failed(tmp_path, tiny_llama, wrong_token_at, capsys,
                                                                monkeypatch):
    wrong_token_at(5)
    monkeypatch.setattr(cli, "running_provider", lambda model: "CUDAExecutionProvider")
    status, err, report, mode = run_bench(tmp_path, tiny_llama[2], capsys)
    assert report["provider"] == "CUDAExecutionProvider" and report["exactness"] == "reported"
    assert status == 0
    assert "error" not in err and "note: DFlash output differed from plain decoding in 1 runs" in err
    assert "from token 5" in err and "up to GPU numerics" in err
    assert mode["mismatches"] == 1 and mode["agreement"]["first_divergence"] == [5]
    assert "reported, not enforced" in (tmp_path / "r.md").read_text()


def test_without_a_divergence_either_provider_passes(tmp_path, tiny_llama, wrong_token_at, capsys):
    status, err, report, mode = run_bench(tmp_path, tiny_llama[2], capsys)  # nothing injected
    assert status == 0 and mode["mismatches"] == 0 and mode["agreement"]["identical"] == 1.0
    assert mode["agreement"]["median_first_divergence"] is None


def summary_report(tmp_path, name, exactness, mismatches):
    report = {"model": str(tmp_path / name / "onnx"), "machine": "m",
              "calibration": {"block": 16, "verify_ratio": 2.0, "draft_ratio": 1.0},
              "summary": {"d": {"prompts": 8, "modes": {
                  "plain": {"decode_tok_s": 10.0},
                  "dflash@16": {"decode_tok_s": 20.0, "speedup_vs_plain": 2.0, "tau_mean": 5.0,
                                "mismatches": mismatches,
                                "agreement": agreement([41] * mismatches + [None] * (8 - mismatches))}}}}}
    if exactness:
        report["exactness"] = exactness
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_gpu_summary_fails_only_on_an_enforced_difference(tmp_path, capsys):
    def status(*reports):
        code = gpu_summary.main([*reports, "--json", str(tmp_path / "gpu.json")])
        return code, capsys.readouterr().out
    code, out = status(summary_report(tmp_path, "a", "reported", 2), summary_report(tmp_path, "b", "enforced", 0))
    assert code == 0 and "6/8 identical, from token 41 (reported)" in out
    code, out = status(summary_report(tmp_path, "a", "enforced", 1))
    assert code == 1 and out.strip().endswith("| NO |")
    code, _ = status(summary_report(tmp_path, "a", None, 1))  # a report from before the field: the CPU's rule
    assert code == 1


def test_filled_caches_go_through_prefill_pieces(tiny_llama):
    from dflash_edge.runtime.model import ExportedModel
    from dflash_edge.runtime.policy import filled_cache, measure_costs

    model = ExportedModel(tiny_llama[2])
    model.prefill_chunk = 16  # what TensorRT sets (1,024 there): no call may hold more tokens
    calls = []
    real = model.run_target

    def run_target(ids, cache, *args, **kwargs):
        calls.append(len(ids))
        return real(ids, cache, *args, **kwargs)
    model.run_target = run_target
    cache, pieces = filled_cache(model, 40)
    assert calls == [16, 16, 8] and cache.length == 40 and [n for _, n in pieces] == [16, 16, 8]
    calls.clear()
    growth = cli.context_growth(model, contexts=(10, 40), repeats=2)
    assert set(growth["step_ms"]) == {"10", "40"} and growth["growth"] is not None
    cal = cli.calibrate(model, 4, context=40, repeats=1)
    assert cal["verify_ratio"] > 0 and cal["draft_ratio"] > 0
    assert calls and max(calls) <= 16, calls  # before: one call of 40 (10 and 40 for context_growth)
    calls.clear()
    verify, rounds = measure_costs(model, context=40, repeats=1)  # the pieces' taps are projected in turn
    assert len(rounds) == model.verify_limit + 1 and calls[:3] == [16, 16, 8]


FAKE_PYTHON = r"""#!/bin/bash
# Stands in for python in benchmarks/gpu.sh: every step is a stub except gpu_summary, which really runs.
echo "$*" >> "$STUBS/calls.log"
case "$1" in
    -) cat > /dev/null; exit 0 ;;  # the pre-flight check
    -c) exit 1 ;;                  # "is TensorRT available?": no
esac
case "$2" in
    dflash_edge.bench.gpu_summary) exec "$REAL_PYTHON" "$@" ;;
    dflash_edge.bench.cli)
        while [ $# -gt 0 ] && [ "$1" != --json ]; do shift; done
        name=$(basename "$2" .json)
        [ -f "$STUBS/$name.json" ] && cp "$STUBS/$name.json" "$2"
        exit "$(cat "$STUBS/$name.status")" ;;
esac
exit 0
"""


def run_gpu_sh(tmp_path, smollm2, llama):
    """benchmarks/gpu.sh --dry-run with every Python step stubbed: `smollm2` and `llama` are (report
    exactness or None for no report, mismatches, the bench's exit status)."""
    import subprocess
    import sys
    from pathlib import Path
    stubs = tmp_path / "stubs"
    stubs.mkdir(parents=True)
    for name, (exactness, mismatches, status) in (("smollm2", smollm2), ("llama8b", llama)):
        if exactness:
            (stubs / f"{name}.json").write_text(Path(summary_report(tmp_path, name, exactness, mismatches)).read_text())
        (stubs / f"{name}.status").write_text(str(status))
    fake = stubs / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                         timeout=120, env={"PYTHON": str(fake), "REAL_PYTHON": sys.executable, "STUBS": str(stubs),
                                           "PATH": "/usr/bin:/bin", "OUT": str(out), "HOME": str(tmp_path),
                                           "PYTHONPATH": str(root)})
    return run, (stubs / "calls.log").read_text()


def test_gpu_sh_runs_the_probes_and_the_table_after_a_failed_bench_and_exits_1(tmp_path):
    run, calls = run_gpu_sh(tmp_path, smollm2=("enforced", 1, 1), llama=("enforced", 0, 0))
    assert run.returncode == 1, run.stderr[-1500:]
    # Everything after the failing bench still ran: both probes, the llama stage, the table (last).
    assert "gpu_probes cuda-graph" in calls and "gpu_probes tensorrt" in calls and "llama8b.json" in calls
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("GPU benchmark (") and lines[-2:] == [
        "| smollm2 | dflash@16 | 10.0 | 20.0 | 2.00x | 5.00 | 1.67x | -20% | NO |",
        "| llama8b | dflash@16 | 10.0 | 20.0 | 2.00x | 5.00 | 1.67x | -20% | yes |"]
    assert "something failed" in run.stderr


def test_gpu_sh_passes_with_a_reported_gpu_divergence_and_fails_on_a_missing_report(tmp_path):
    run, _ = run_gpu_sh(tmp_path / "ok", smollm2=("reported", 2, 0), llama=("enforced", 0, 0))
    assert run.returncode == 0, run.stderr[-1500:]
    assert "6/8 identical, from token 41 (reported)" in run.stdout
    run, _ = run_gpu_sh(tmp_path / "crash", smollm2=("enforced", 0, 0), llama=(None, 0, 1))  # crashed, no report
    assert run.returncode == 1 and "error: no llama8b report" in run.stderr
    assert run.stdout.strip().splitlines()[-1].endswith("| yes |")  # the table of what did run
