"""The command lines: JSON output, and one clear line with exit status 2 for every bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest

EXPORT = [sys.executable, "-m", "dflash_edge.export.cli"]
GENERATE = [sys.executable, "-m", "dflash_edge.runtime.cli"]


def run(cmd, env=None, stdin=None):
    return subprocess.run(cmd, capture_output=True, env=env, input=stdin, timeout=600)


def test_generate_json_reports_text_ids_and_speculative_stats(tiny_llama):
    out = run(GENERATE + ["--model", str(tiny_llama[2]), "hello world", "--max-new-tokens", "12", "--json"])
    assert out.returncode == 0, out.stderr.decode()
    d = json.loads(out.stdout)
    for key in ("text", "token_ids", "prompt_tokens", "ttft_s", "decode_tokens_per_s", "tau", "rounds",
                "acceptance_histogram", "draft_s", "verify_s", "block_size", "finish_reason", "lookup_rounds",
                "lookup_tokens"):
        assert key in d, key
    assert 1 <= len(d["token_ids"]) <= 12 and d["block_size"] == "auto"
    assert sum(d["block_histogram"].values()) == d["rounds"]
    fixed = json.loads(run(GENERATE + ["--model", str(tiny_llama[2]), "hello world", "--max-new-tokens", "12",
                                       "--json", "--block-size", "16"]).stdout)
    assert fixed["block_size"] == 16 and fixed["token_ids"] == d["token_ids"]
    plain = json.loads(run(GENERATE + ["--model", str(tiny_llama[2]), "hello world", "--max-new-tokens", "12",
                                       "--json", "--no-draft"]).stdout)
    assert plain["token_ids"] == d["token_ids"] and plain["text"] == d["text"]
    assert plain["block_size"] == 1
    repetitive = ["one two three one two three one two three one two"]
    drafter_only = json.loads(run(GENERATE + ["--model", str(tiny_llama[2]), *repetitive, "--max-new-tokens", "40",
                                              "--json", "--no-lookup"]).stdout)
    both = json.loads(run(GENERATE + ["--model", str(tiny_llama[2]), *repetitive, "--max-new-tokens", "40",
                                      "--json"]).stdout)
    assert drafter_only["lookup_rounds"] == 0 < both["lookup_rounds"]
    assert drafter_only["token_ids"] == both["token_ids"]


def test_generate_streams_text_and_reports_speed(tiny_llama):
    from dflash_edge.runtime.api import DFlashModel

    out = run(GENERATE + ["--model", str(tiny_llama[2]), "-", "--max-new-tokens", "12"], stdin=b"hello world")
    assert out.returncode == 0, out.stderr.decode()
    # What streams must be the reply itself, whole and nothing else: plain decoding of the same prompt
    # through the API, and the token count the summary line gives must be that reply's.
    plain = DFlashModel(tiny_llama[2], use_drafter=False).generate("hello world", 12, 1)
    assert plain.text.strip(), "the tiny model's reply is empty: the comparison would prove nothing"
    assert out.stdout.decode() == plain.text
    summary = out.stderr.decode().strip().splitlines()[-1]
    assert summary.startswith(f"[{len(plain.token_ids)} tokens, ") and " tok/s decode" in summary, summary


def test_generate_profile_breaks_a_round_down(tiny_llama):
    out = run(GENERATE + ["--model", str(tiny_llama[2]), "hello", "--max-new-tokens", "20", "--block-size", "4",
                          "--profile"])
    assert out.returncode == 0, out.stderr.decode()
    line = [l for l in out.stderr.decode().splitlines() if l.startswith("[profile:")][0]
    assert "draft" in line and "verify" in line and "host" in line and "{4:" in line


def test_generate_compare_reports_speedup_and_identical_output(tiny_llama):
    out = run(GENERATE + ["--model", str(tiny_llama[2]), "hello world", "--max-new-tokens", "12", "--compare"])
    assert out.returncode == 0, out.stderr.decode()
    assert b"x plain, identical output" in out.stderr and b"tau" in out.stderr
    d = json.loads(run(GENERATE + ["--model", str(tiny_llama[2]), "hello world", "--max-new-tokens", "12",
                                   "--compare", "--json"]).stdout)
    assert d["plain"]["identical"] and d["plain"]["block_size"] == 1 and d["block_size"] == "auto"


@pytest.fixture(scope="module")
def broken(tiny_llama, tmp_path_factory):
    """Damaged copies of an export."""
    root = tmp_path_factory.mktemp("broken")
    src = tiny_llama[2]
    newer = shutil.copytree(src, root / "newer")
    m = json.loads((newer / "dflash_edge.json").read_text())
    m["format_version"] = 99
    (newer / "dflash_edge.json").write_text(json.dumps(m))
    older = shutil.copytree(src, root / "older")
    m["format_version"] = 2
    (older / "dflash_edge.json").write_text(json.dumps(m))
    truncated = shutil.copytree(src, root / "truncated")
    data = (truncated / "target.onnx").read_bytes()
    (truncated / "target.onnx").write_bytes(data[: len(data) // 3])
    (root / "empty").mkdir()
    cut = shutil.copytree(src, root / "cut-weights")
    with open(cut / "shared_weights.data", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    garbled = shutil.copytree(src, root / "garbled")
    (garbled / "dflash_edge.json").write_text("{not json")
    return root


GENERATE_CASES = {
    "missing folder": (["--model", "/nonexistent/x", "hi"], "does not exist"),
    "not an export": (["--model", "{broken}/empty", "hi"], "not a dflash-edge export"),
    "newer manifest": (["--model", "{broken}/newer", "hi"], "format version 99"),
    "older manifest": (["--model", "{broken}/older", "hi"], "older dflash-edge"),
    "corrupted manifest": (["--model", "{broken}/garbled", "hi"], "corrupted"),
    "truncated graph": (["--model", "{broken}/truncated", "hi"], "target.onnx"),
    "truncated external data": (["--model", "{broken}/cut-weights", "hi"], "shared_weights.data is truncated"),
    "unknown provider": (["--model", "{export}", "hi", "--provider", "metal"], "unknown provider"),
    "unavailable provider": (["--model", "{export}", "hi", "--provider", "tensorrt"], "not available"),
    "empty prompt": (["--model", "{export}", "   "], "empty"),
    "zero max tokens": (["--model", "{export}", "hi", "--max-new-tokens", "0"], "at least 1"),
    "max tokens over context": (["--model", "{export}", "hi", "--max-new-tokens", "100000"], "context"),
    "block over trained size": (["--model", "{export}", "hi", "--block-size", "17"], "trained block size"),
    "prompt over context": (["--model", "{export}", "--raw", "the " * 600], "context"),
    "compare without drafting": (["--model", "{export}", "hi", "--compare", "--no-draft"], "--compare needs"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_bad_input(case, tiny_llama, broken):
    args, expected = GENERATE_CASES[case]
    args = [a.format(broken=broken, export=tiny_llama[2]) for a in args]
    out = run(GENERATE + args)
    err = out.stderr.decode().strip()
    assert out.returncode == 2, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err


def test_generate_rejects_invalid_utf8(tiny_llama):
    out = run(GENERATE + ["--model", str(tiny_llama[2]), "-"], stdin=b"\xff\xfe bad")
    assert out.returncode == 2 and b"UTF-8" in out.stderr


def test_export_alias_without_weights_names_the_download(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    out = run(EXPORT + ["--model", "llama3.1-8b", "--output", str(tmp_path / "o")], env=env)
    err = out.stderr.decode().strip()
    assert out.returncode == 2, err
    assert len(err.splitlines()) == 1
    assert "huggingface-cli download meta-llama/Llama-3.1-8B-Instruct" in err
    assert not (tmp_path / "o").exists()


EXPORT_CASES = {
    "unknown alias": (["--model", "gpt5-tiny"], "unknown model"),
    "missing model folder": (["--model", "/nonexistent/hf"], "does not exist"),
    "unwritable output": (["--model", "{hf}", "--output", "/proc/none/out"], "cannot write"),
    "folder without config": (["--model", "{tmp}"], "no config.json"),
    "bad layers": (["--model", "{hf}", "--layers", "1,x"], "comma-separated"),
    "layers past the model": (["--model", "{hf}", "--layers", "1,99"], "outside"),
    "output exists": (["--model", "{hf}", "--output", "{tmp}"], "already exists"),
    "drafter folder missing": (["--model", "{hf}", "--drafter", "/nonexistent/d"], "does not exist"),
    "drafter for another target": (["--model", "{hf}", "--drafter", "{wide_drafter}"], "does not fit"),
    "unsupported drafter": (["--model", "{hf}", "--drafter", "{swa_drafter}"], "sliding-window"),
    "unsupported architecture": (["--model", "{gpt2}"], "not supported"),
}


@pytest.fixture(scope="module")
def odd_inputs(tmp_path_factory, tiny_llama):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dflash_edge.bench.synthetic import make_tokenizer

    root = tmp_path_factory.mktemp("odd")
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    make_tokenizer().save_pretrained(gpt2)
    from transformers import AutoConfig

    from dflash_edge.export.drafter import config_for_target, random_drafter, save_drafter
    wider = AutoConfig.from_pretrained(tiny_llama[0])
    wider.hidden_size = 96
    wide = root / "wide"
    save_drafter(random_drafter(config_for_target(wider, mask_token_id=3)), wide)
    swa = shutil.copytree(tiny_llama[1], root / "swa")
    cfg = json.loads((swa / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention"]
    (swa / "config.json").write_text(json.dumps(cfg))
    return {"gpt2": gpt2, "wide_drafter": wide, "swa_drafter": swa}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_bad_input(case, tiny_llama, odd_inputs, tmp_path):
    args, expected = EXPORT_CASES[case]
    args = [a.format(tmp=tmp_path, hf=tiny_llama[0], **odd_inputs) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    before = tree(tmp_path)
    out = run(EXPORT + args)
    err = out.stderr.decode()
    assert out.returncode == 2, (case, err)
    # One line and nothing else: no warnings before it, no progress, no traceback.
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, (case, err)
    assert expected in err, err
    assert b"Traceback" not in out.stdout  # stdout may carry progress ("loading ..."), never the error
    # Nothing written: no output folder, no temporary .out.partial-PID beside it, no file touched.
    assert tree(tmp_path) == before, case


def tree(root):
    """Every path under root with its size and modification time, to show that nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _gone_pid() -> int:
    """The id of a process that has exited (what a killed export's folder names carry)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_export_force_refuses_a_folder_that_is_not_an_export(tiny_llama, tmp_path):
    """--force deletes what it replaces, so it takes only an earlier export (or an empty folder)."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "thesis.tex").write_text("keep me too")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    for target, expected in ((mine, "not a dflash-edge export"), (a_file, "not a folder")):
        before = tree(tmp_path)
        out = run(EXPORT + ["--model", str(tiny_llama[0]), "--no-drafter", "--output", str(target), "--force"])
        err = out.stderr.decode()
        assert out.returncode == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
        assert tree(tmp_path) == before  # nothing deleted, nothing set aside, no partial folder
    assert (mine / "sub" / "thesis.tex").read_text() == "keep me too"


def test_export_force_replaces_an_earlier_export_or_an_empty_folder(tiny_llama, tmp_path, monkeypatch):
    """The replacement itself, with the tracing stubbed out (the real export is tested elsewhere)."""
    from dflash_edge.export import pipeline
    from dflash_edge.manifest import MANIFEST_NAME

    def build(tmp, *args, **kwargs):
        (tmp / "target.onnx").write_text("new")
        return {"stub": True}

    monkeypatch.setattr(pipeline, "_build", build)
    earlier = shutil.copytree(tiny_llama[2], tmp_path / "earlier")
    # What an export killed after its second rename leaves: the export it replaced, set aside.
    shutil.copytree(tiny_llama[2], tmp_path / f".earlier.old-{_gone_pid()}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (earlier, empty):
        assert pipeline.export(str(tiny_llama[0]), str(out), drafter="", force=True, log=lambda *a: None) == out
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "target.onnx"]
        assert json.loads((out / MANIFEST_NAME).read_text())["stub"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty"]  # nothing set aside is left,
    # not even the earlier killed export's


def test_export_puts_back_the_folder_a_killed_replacement_set_aside(tiny_llama, tmp_path):
    """Killed between its two renames, an export leaves no output folder, only .NAME.old-PID: the next run
    renames it back before anything else (here it then refuses, since the folder exists again)."""
    out = tmp_path / "out"
    aside = shutil.copytree(tiny_llama[2], tmp_path / f".out.old-{_gone_pid()}")
    alive = shutil.copytree(tiny_llama[2], tmp_path / f".other.old-{os.getpid()}")
    run_ = run(EXPORT + ["--model", str(tiny_llama[0]), "--no-drafter", "--output", str(out)])
    err = run_.stderr.decode()
    assert run_.returncode == 2 and "already exists" in err and err.count("\n") == 1, err
    assert b"restored" in run_.stdout
    assert not aside.exists() and tree(out) == tree(tiny_llama[2])
    # Another output's folder, or one whose process still runs, is not touched.
    other = tmp_path / "other"
    run_ = run(EXPORT + ["--model", str(tiny_llama[0]), "--no-drafter", "--output", str(other), "--layers", "1,99"])
    assert run_.returncode == 2 and b"outside" in run_.stderr  # refused after the look for folders set aside
    assert alive.exists() and not other.exists()


TRAIN = [sys.executable, "-m", "dflash_edge.train.cli"]


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-inputs")
    (root / "bad.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (root / "ok.jsonl").write_text('{"prompt": "hi"}\n')
    (root / "broken.jsonl").write_text('{"prompt": "hi"\n')
    return root


TRAIN_CASES = {
    "missing data": (["--data", "/nonexistent.jsonl", "--output", "{root}/o"], "does not exist"),
    "data is a folder": (["--data", "{root}", "--output", "{root}/o"], "is not a file"),
    "data not UTF-8": (["--data", "{root}/bad.jsonl", "--output", "{root}/o"], "not valid UTF-8"),
    "data not JSON": (["--data", "{root}/broken.jsonl", "--output", "{root}/o"], "not valid JSON"),
    "zero steps": (["--data", "{root}/ok.jsonl", "--output", "{root}/o", "--steps", "0"], "--steps must be at least 1"),
    "zero layers": (["--data", "{root}/ok.jsonl", "--output", "{root}/o", "--draft-layers", "0"], "--draft-layers"),
    "block of one": (["--data", "{root}/ok.jsonl", "--output", "{root}/o", "--block-size", "1"], "at least 2"),
    "unwritable output": (["--data", "{root}/ok.jsonl", "--output", "/proc/none/o"], "cannot write"),
    "unknown target": (["--data", "{root}/ok.jsonl", "--output", "{root}/o", "--target", "gpt5-tiny"], "unknown model"),
    "no data": (["--output", "{root}/o"], "give --data"),
    "output is another folder": (["--data", "{root}/ok.jsonl", "--output", "{root}"], "not a drafter checkpoint"),
    "init not a drafter": (["--data", "{root}/ok.jsonl", "--output", "{root}/o", "--init", "{root}"], "no config.json"),
    "shards not a folder": (["--shards", "{root}/ok.jsonl", "--output", "{root}/o"], "not a shard folder"),
    "zero shard tokens": (["--shards", "{root}", "--output", "{root}/o", "--shard-tokens", "0"], "--shard-tokens"),
    "dpace alpha": (["--data", "{root}/ok.jsonl", "--output", "{root}/o", "--dpace", "1.5"], "--dpace"),
    "soft weight": (["--data", "{root}/ok.jsonl", "--output", "{root}/o", "--soft-targets", "4",
                     "--soft-weight", "2"], "--soft-weight"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(case, train_inputs):
    args, expected = TRAIN_CASES[case]
    out = run(TRAIN + [a.format(root=train_inputs) for a in args])
    err = out.stderr.decode().strip()
    assert out.returncode == 2, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and expected in err, err
    assert not (train_inputs / "o").exists() and not (train_inputs / "o.work").exists()


DATA_CASES = {
    "regenerate: missing prompts": (["dflash_edge.train.regenerate", "--prompts", "/none.jsonl", "--output",
                                     "{root}/s"], "does not exist"),
    "regenerate: output is a file": (["dflash_edge.train.regenerate", "--prompts", "{root}/ok.jsonl",
                                      "--output", "{root}/ok.jsonl"], "is not a folder"),
    "regenerate: zero batch": (["dflash_edge.train.regenerate", "--prompts", "{root}/ok.jsonl", "--output",
                                "{root}/s", "--batch", "0"], "--batch"),
    "selfquery: no count": (["dflash_edge.train.selfquery", "{root}/q.jsonl", "--count", "0"], "--count"),
    "selfquery: hot": (["dflash_edge.train.selfquery", "{root}/q.jsonl", "--count", "5", "--top-p", "0"], "--top-p"),
    "selfquery: bad exclude": (["dflash_edge.train.selfquery", "{root}/q.jsonl", "--count", "5", "--exclude",
                                "/none.jsonl"], "--exclude"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_commands_bad_input(case, train_inputs):
    args, expected = DATA_CASES[case]
    out = run([sys.executable, "-m"] + [a.format(root=train_inputs) for a in args])
    err = out.stderr.decode().strip()
    assert out.returncode == 2, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and expected in err, err
    assert not (train_inputs / "s").exists() and not (train_inputs / "q.jsonl").exists()


SERVE = [sys.executable, "-m", "dflash_edge.runtime.server"]


def test_serve_bad_input(tiny_llama, broken):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    cases = {
        "missing folder": (["--model", "/nonexistent/x"], "does not exist"),
        "not an export": (["--model", f"{broken}/empty"], "not a dflash-edge export"),
        "truncated graph": (["--model", f"{broken}/truncated"], "target.onnx"),
        "unknown provider": (["--model", str(tiny_llama[2]), "--provider", "metal"], "unknown provider"),
        "unavailable provider": (["--model", str(tiny_llama[2]), "--provider", "cuda"], "--fallback cpu"),
        "port out of range": (["--model", str(tiny_llama[2]), "--port", "70000"], "--port"),
        "port in use": (["--model", str(tiny_llama[2]), "--port", port], "cannot listen"),
    }
    for case, (args, expected) in cases.items():
        out = run(SERVE + args)
        err = out.stderr.decode().strip()
        assert out.returncode == 2, (case, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err and expected in err, (case, err)
    taken.close()


@pytest.mark.parametrize("as_json", [False, True])
def test_generate_compare_reports_a_differing_output_and_exits_1(tiny_llama, monkeypatch, capsys, as_json):
    """Inject a changed token into the DFlash run only: --compare must say so and fail, not report identity."""
    import dataclasses

    from dflash_edge.runtime import api
    from dflash_edge.runtime.cli import main

    real = api.DFlashModel.generate

    def altered(self, prompt, max_new_tokens=256, block_size=None, *args, **kwargs):
        result = real(self, prompt, max_new_tokens, block_size, *args, **kwargs)
        if block_size == 1 or max_new_tokens <= 2:  # plain decoding (and its warm-up) stay as they are
            return result
        ids = list(result.token_ids)
        ids[3] = (ids[3] + 1) % 100
        return dataclasses.replace(result, token_ids=ids)

    monkeypatch.setattr(api.DFlashModel, "generate", altered)
    argv = ["--model", str(tiny_llama[2]), "hello world", "--max-new-tokens", "12", "--compare"]
    assert main(argv + (["--json"] if as_json else [])) == 1
    captured = capsys.readouterr()
    if as_json:
        assert json.loads(captured.out)["plain"]["identical"] is False
    else:
        assert "OUTPUT DIFFERS" in captured.err and "identical output" not in captured.err
