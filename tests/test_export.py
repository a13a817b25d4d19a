"""Target export on tiny random Llama and Qwen3: graph contract, exactness vs transformers, tap convention."""
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from dflash_edge.runtime.generate import generate
from dflash_edge.runtime.model import ExportedModel

from drafts import accepting as _accepting


def test_manifest_describes_the_folder(tiny):
    _, _, out = tiny
    m = json.loads((out / "dflash_edge.json").read_text())
    assert m["format_version"] == 4
    assert m["target"]["graph"] == "target.onnx"
    assert all(v["ok"] for v in m["export"]["validation"].values())
    assert m["stop_token_ids"] == [2]
    assert m["drafter"]["block_size"] == 16
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
              "drafter/config.json", "shared_weights.data", "drafter_context.onnx", "drafter_block.onnx"):
        assert (out / f).is_file(), f
    assert not list(out.parent.glob(".onnx.partial-*")), "temporary export folder left behind"


def test_graph_io_follows_the_llm_convention(tiny):
    _, _, out = tiny
    graph = onnx.load(str(out / "target.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    assert inputs[:3] == ["input_ids", "position_ids", "logits_index"]
    assert "past_key_values.0.key" in inputs and "past_key_values.5.value" in inputs
    # Keys [b, kv, slots, d]; values stored transposed, [b, kv, d, slots], so attention streams the cache.
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    key, value = dims["past_key_values.0.key"], dims["past_key_values.0.value"]
    assert isinstance(key[2], str) and isinstance(key[3], int)
    assert isinstance(value[2], int) and isinstance(value[3], str) and value[2] == key[3]
    assert outputs[:3] == ["logits", "next_token_ids", "aux_hidden_states"]
    assert "present.0.key" in outputs and "present.5.value" in outputs


def test_the_drafter_reads_the_vocab_matrices_from_the_shared_file(tiny):
    """The drafter's block graph names them as the shared file's index does and points at that file; the
    target keeps its own copy under other names (target.*), which a decode step reads faster."""
    _, _, out = tiny
    manifest = json.loads((out / "dflash_edge.json").read_text())
    index = manifest["shared_weights"]["tensors"]
    tied = json.loads((out / "config.json").read_text()).get("tie_word_embeddings", False)
    assert set(index) == {"embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
    block = onnx.load(str(out / "drafter_block.onnx"), load_external_data=False).graph
    found = {t.name: {e.key: e.value for e in t.external_data} for t in block.initializer if t.name in index}
    assert set(found) == set(index)
    for name, info in found.items():
        assert info["location"] == "shared_weights.data" and int(info["offset"]) == index[name]["offset"]
    target = onnx.load(str(out / "target.onnx"), load_external_data=False).graph
    names = {t.name for t in target.initializer}
    assert "target.embed_tokens.weight" in names and not names & set(index)


def test_prefill_computes_logits_only_where_asked(tiny):
    _, _, out = tiny
    model = ExportedModel(out, load_drafter=False)
    cache = model.new_target_cache()
    step = model.run_target(list(range(5, 25)), cache, last_only=True, logits=True, taps=True)
    assert step.logits.shape[0] == 1 and step.taps.shape()[:2] == [1, 20]
    assert step.next_ids.tolist() == [int(step.logits[0].argmax())]


def test_onnx_runtime_fuses_every_rms_norm_of_the_target(tiny, tmp_path):
    # Written as x / sqrt(mean(x^2) + eps), each norm becomes one fused node instead of seven: a decode
    # step is mostly per-node overhead on a CPU once the weights are read.
    import onnxruntime as ort

    from dflash_edge.runtime.session import SharedWeights

    _, _, out = tiny
    manifest = json.loads((out / "dflash_edge.json").read_text())
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    for name, value in SharedWeights(out, manifest["shared_weights"]).for_graph("target.onnx").items():
        options.add_initializer(name, value)
    ort.InferenceSession(str(out / "target.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    layers = manifest["target"]["num_layers"]
    # Two per layer and the final one (Qwen3's q/k norms fuse too); no piece of one is left unfused.
    assert ops.count("SimplifiedLayerNormalization") >= 2 * layers + 1
    assert not {"Pow", "Sqrt", "Reciprocal"} & set(ops)


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
@pytest.mark.parametrize("groups, seq", [(2, 3), (3, 1), (3, 16), (2, 9), (1, 20)])
def test_buffered_attention_equals_plain_attention_for_any_kv_head_count(kv_heads, groups, seq):
    # With an odd number of KV heads the exported attention splits each head's products in two, and the
    # values product hands the heads back laid out for o_proj, [1, seq, heads * d], whatever the grouping.
    from dflash_edge.export.modeling import attend, attend_buffer

    g = torch.Generator().manual_seed(kv_heads)
    heads, d, slots = groups * kv_heads, 16, 32
    positions = torch.arange(10, 10 + seq)
    q = torch.randn(1, heads, seq, d, generator=g)
    keys = torch.randn(1, kv_heads, slots, d, generator=g)
    values = torch.randn(1, kv_heads, slots, d, generator=g)
    visible = torch.arange(slots)[None, :] <= positions[:, None]
    bias = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]
    got = attend_buffer(q, keys, values.transpose(-1, -2).contiguous(), bias, positions)
    end = 10 + seq
    want = attend(q, keys[:, :, :end], values[:, :, :end], bias[..., :end]).transpose(1, 2).reshape(1, seq, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _hf_greedy(hf_dir, prompt_ids, n):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("prompt", ["hello world", "the cat sat on the mat and the dog ran to the big red mat"])
def test_plain_decoding_equals_transformers_greedy(tiny, prompt):
    hf_dir, _, out = tiny
    model = ExportedModel(out, load_drafter=False)
    model.stop_token_ids = set()  # compare a fixed number of tokens
    prompt_ids = model.tokenizer.encode(prompt)
    ids, _ = generate(model, prompt_ids, 24, block_size=1)
    assert ids == _hf_greedy(hf_dir, prompt_ids, 24)


def test_taps_are_outputs_of_the_listed_blocks(tiny):
    """z-lab's convention: tap id l = output of decoder block l = HF hidden_states[l + 1]."""
    from transformers import AutoModelForCausalLM

    hf_dir, _, out = tiny
    model = ExportedModel(out, load_drafter=False)
    ids = model.tokenizer.encode("the dog sat on the big mat")
    taps = model.run_target(ids, model.new_target_cache(), last_only=True, taps=True).taps.numpy()[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    layer_ids = model.target_info["tap_layer_ids"]
    h = model.target_info["hidden_size"]
    for k, layer in enumerate(layer_ids):
        got = taps[:, k * h:(k + 1) * h]
        np.testing.assert_allclose(got, hs[layer + 1][0].numpy(), rtol=1e-4, atol=1e-4)
        # An off-by-one (the block's input instead of its output) must not pass.
        assert not np.allclose(got, hs[layer][0].numpy(), rtol=1e-2, atol=1e-2)


def test_chat_template_matches_transformers(tiny):
    from transformers import AutoTokenizer

    from dflash_edge.runtime.chat import render_chat

    hf_dir, _, out = tiny
    model = ExportedModel(out, load_drafter=False)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    messages = [("system", "be kind"), ("user", "hello"), ("assistant", "yes"), ("user", "why")]
    expected = tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                       add_generation_prompt=True)
    text = render_chat(model.chat, messages)
    assert text == expected
    assert model.tokenizer.encode(text) == tok(expected, add_special_tokens=False).input_ids


def _export_variant(tmp_path, tiny_llama, **kwargs):
    from dflash_edge.export.pipeline import export

    hf_dir, drafter_dir, _ = tiny_llama
    return export(str(hf_dir), str(tmp_path / "out"), drafter=str(drafter_dir), log=lambda *a: None, **kwargs)


def test_fp16_export_is_lossless_against_its_own_plain_decoding(tmp_path, tiny_llama):
    out = _export_variant(tmp_path, tiny_llama, dtype="fp16")
    model = ExportedModel(out)
    assert model.kv_dtype == np.float16
    model.stop_token_ids = set()
    ids = model.tokenizer.encode("the cat sat on the mat")
    plain, _ = generate(model, ids, 30, block_size=1)
    assert generate(model, ids, 30, block_size=8)[0] == plain
    got, multi = _accepting(model, ids, plain, 8)
    assert got == plain and multi >= 3
    reference = ExportedModel(tiny_llama[2], load_drafter=False)
    reference.stop_token_ids = set()
    # Random weights with sharp logits: fp16 keeps the greedy path of fp32 here.
    assert plain[:10] == generate(reference, ids, 10, block_size=1)[0]


def test_external_data_export_runs(tmp_path, tiny_llama, monkeypatch):
    """Graphs of 2 GB or more go to external data; the shared vocab file must still work with them."""
    from dflash_edge.export import trace

    monkeypatch.setattr(trace, "EXTERNAL_DATA_THRESHOLD", 0)
    out = _export_variant(tmp_path, tiny_llama)
    assert (out / "target.onnx.data").is_file()
    model = ExportedModel(out)
    reference = ExportedModel(tiny_llama[2])
    ids = model.tokenizer.encode("hello world")
    assert generate(model, ids, 20, block_size=4)[0] == generate(reference, ids, 20, block_size=4)[0]


def test_reduced_draft_vocabulary_scores_only_its_tokens_and_stays_lossless(tiny_llama, tmp_path):
    import shutil

    from dflash_edge.errors import UserError
    from dflash_edge.export.drafter import write_draft_vocab
    from dflash_edge.export.pipeline import export
    from dflash_edge.runtime.generate import generate

    hf, drafter, _ = tiny_llama
    with_vocab = shutil.copytree(drafter, tmp_path / "drafter")
    keep = list(range(3, 43))  # 40 of the tiny vocabulary's tokens
    write_draft_vocab(with_vocab, keep, coverage=0.9)
    with pytest.raises(UserError, match="exceeds the 40 tokens"):
        export(str(hf), str(tmp_path / "x"), drafter=str(with_vocab), draft_vocab=41, log=lambda *a: None)
    with pytest.raises(UserError, match="has no draft_vocab.json"):
        export(str(hf), str(tmp_path / "x"), drafter=str(drafter), draft_vocab=8, log=lambda *a: None)
    assert not (tmp_path / "x").exists()

    out = export(str(hf), str(tmp_path / "onnx"), drafter=str(with_vocab), draft_vocab=16, log=lambda *a: None)
    model = ExportedModel(out)
    assert model.manifest["drafter"]["draft_vocab_size"] == 16
    model.stop_token_ids = set()
    ids = model.tokenizer.encode("the cat sat on the mat")
    taps = model.run_target(ids, model.new_target_cache(), last_only=True, taps=True).taps
    cache = model.new_draft_cache()
    model.project_context([(taps, len(ids))], cache)
    assert set(model.draft(5, len(ids), 16, cache)) <= set(keep[:16])
    plain = generate(model, ids, 40, block_size=1)[0]
    assert generate(model, ids, 40, block_size=8)[0] == plain


@pytest.mark.parametrize("kind,product", [("int8", "MatMulNBits"), ("int8-tokens", "MatMulInteger"),
                                          ("int4", "MatMulNBits")])
def test_quantized_target_is_lossless_against_its_own_plain_decoding(tmp_path, tiny_llama, kind, product):
    out = _export_variant(tmp_path, tiny_llama, quantize=kind)
    manifest = json.loads((out / "dflash_edge.json").read_text())
    assert manifest["target"]["quantization"] == kind
    graph = onnx.load(str(out / "target.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert product in ops and "MatMul" in ops  # the attention's products stay fp32
    if kind == "int8-tokens":  # the LM head too is an int8 product
        assert "Gemm" not in ops
    validation = manifest["export"]["validation"]
    # The trace, before quantizing: whole when traced with its weights (int8-tokens), else on the first layers
    # of the streamed export.
    assert validation["target (fp32):logits" if kind == "int8-tokens" else "first 2 layers (fp32):logits"]["ok"]
    assert validation[f"target ({kind}):rows = one at a time"]["ok"]
    model = ExportedModel(out)
    model.stop_token_ids = set()
    ids = model.tokenizer.encode("the cat sat on the mat")
    plain, _ = generate(model, ids, 30, block_size=1)
    for block in (4, 16, None):
        assert generate(model, ids, 30, block_size=block)[0] == plain
    for block in (4, 16):
        got, multi = _accepting(model, ids, plain, block)
        assert got == plain and multi >= 2


@pytest.mark.parametrize("quantize", [None, "int8-tokens"])
def test_a_target_exports_without_a_drafter(tmp_path, tiny_qwen3, quantize):
    # Nothing to share the vocab matrices with: the export used to fail looking for them.
    from dflash_edge.export.pipeline import export

    out = export(str(tiny_qwen3[0]), str(tmp_path / "out"), log=lambda *a: None, quantize=quantize)
    manifest = json.loads((out / "dflash_edge.json").read_text())
    assert manifest["drafter"] is None and manifest["shared_weights"] is None
    model = ExportedModel(out)
    model.stop_token_ids = set()
    ids = model.tokenizer.encode("the cat sat on the mat the cat sat on the")
    plain, _ = generate(model, ids, 30, block_size=1)
    assert generate(model, ids, 30, block_size=None)[0] == plain  # prompt lookup


class _RowSession:
    """A stand-in target graph whose logits for a token depend on how many tokens came in the call, as
    a kernel that shares activation scales across rows would."""

    def __init__(self, shared_across_rows: bool):
        self.shared = shared_across_rows

    def get_outputs(self):
        return [SimpleNamespace(name=n) for n in ("logits", "next_token_ids", "present.0.key")]

    def run(self, _, feeds):
        ids = feeds["input_ids"].astype(np.float32)
        logits = np.stack([ids, -ids], axis=-1) + (0.01 * ids.shape[1] if self.shared else 0.0)
        return [logits, logits.argmax(-1), feeds["past_key_values.0.key"]]


@pytest.mark.parametrize("shared", [False, True])
def test_row_check_catches_logits_that_depend_on_the_other_tokens_of_a_verify(shared):
    from dflash_edge.export.validate import Report, check_rows_independent

    names = ["input_ids", "position_ids", "logits_index", "past_key_values.0.key"]
    report = Report(1e-4)
    check_rows_independent(_RowSession(shared), names, np.array([[3, 1, 4, 1]]), [np.zeros((1, 1, 8, 2))], 2,
                           report, "target")
    assert report.ok is not shared


@pytest.mark.parametrize("kind", ["int8", "int8-tokens"])
def test_an_int8_verify_computes_each_row_exactly_as_a_single_step_does(tmp_path, tiny_llama, kind):
    # int8 rounds activations, so any difference between a verify's rows and single steps becomes different
    # tokens. Bit for bit past 1,024 cache slots, where ONNX Runtime's CPU MatMul used to sum a 16-token
    # verify's values product (32 columns for 2 query heads per KV head) in other pieces than a step's.
    from dflash_edge.export.modeling import cache_shapes
    from dflash_edge.export.validate import Report, check_rows_independent
    from dflash_edge.runtime.session import SharedWeights, make_session

    out = _export_variant(tmp_path, tiny_llama, quantize=kind)
    manifest = json.loads((out / "dflash_edge.json").read_text())
    target = manifest["target"]
    session = make_session(out / target["graph"], ["CPUExecutionProvider"],
                           SharedWeights(out, manifest.get("shared_weights")))
    rng = np.random.default_rng(0)
    shapes = cache_shapes(target["num_layers"], target["num_kv_heads"], target["head_dim"], 1152)
    cache = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    report = Report(1e-4)
    check_rows_independent(session, target["inputs"], rng.integers(3, 40, (1, 16)), cache, 1100, report, "t")
    assert report.rows[0][2] == 0.0


def test_quantized_export_keeps_external_data_and_refuses_bad_options(tmp_path, tiny_llama, monkeypatch):
    from dflash_edge.errors import UserError
    from dflash_edge.export import trace

    with pytest.raises(UserError, match="--quantize must be one of"):
        _export_variant(tmp_path, tiny_llama, quantize="int3")
    with pytest.raises(UserError, match="fp32"):
        _export_variant(tmp_path, tiny_llama, quantize="int4", dtype="fp16")
    monkeypatch.setattr(trace, "EXTERNAL_DATA_THRESHOLD", 0)
    out = _export_variant(tmp_path, tiny_llama, quantize="int4")
    assert (out / "target.onnx.data").is_file()
    model = ExportedModel(out)
    ids = model.tokenizer.encode("hello world")
    assert generate(model, ids, 20, block_size=4)[0] == generate(model, ids, 20, block_size=1)[0]


def _custom_ops(path) -> set[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {f"{n.domain}.{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_tensorrt_variant_has_standard_ops_only_and_int4_stays_lossless(tmp_path, tiny_llama, dtype):
    """TensorRT takes a graph whole only without contrib ops: int4 weights as block-quantized DequantizeLinear."""
    out = _export_variant(tmp_path, tiny_llama, quantize="int4", variant="tensorrt", dtype=dtype)
    manifest = json.loads((out / "dflash_edge.json").read_text())
    assert manifest["variant"] == "tensorrt" and manifest["target"]["quantization"] == "int4"
    for graph in ("target.onnx", "drafter_context.onnx", "drafter_block.onnx"):
        onnx.checker.check_model(str(out / graph))
        assert not _custom_ops(out / graph), graph
        assert manifest["export"]["validation"][f"{graph[:-5]}:standard ops only"]["ok"]
    target = onnx.load(str(out / "target.onnx"), load_external_data=False)
    blocked = [n for n in target.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert len(blocked) == 6 * 7  # q, k, v, o, gate, up and down in each of the 6 layers
    model = ExportedModel(out)
    model.stop_token_ids = set()
    ids = model.tokenizer.encode("the cat sat on the mat")
    plain, _ = generate(model, ids, 30, block_size=1)
    for block in (4, None):
        assert generate(model, ids, 30, block_size=block)[0] == plain
    got, multi = _accepting(model, ids, plain, 8)
    assert got == plain and multi >= 3


def test_standard_ops_check_catches_contrib_ops(tmp_path, tiny_llama):
    """The check the tensorrt variant relies on fails on the ort variant's MatMulNBits."""
    from dflash_edge.export.validate import Report, check_standard_ops

    out = _export_variant(tmp_path, tiny_llama, quantize="int4")
    assert "com.microsoft.MatMulNBits" in _custom_ops(out / "target.onnx")
    report = Report(1e-4)
    check_standard_ops(out, ["target.onnx", "drafter_block.onnx"], report)
    assert not report.ok
    assert any("com.microsoft.MatMulNBits" in line for line in report.lines())


def test_jetson_preset_picks_tensorrt_fp16_and_int4_for_large_targets(tmp_path, tiny_llama):
    from dflash_edge.errors import UserError
    from dflash_edge.export.devices import apply_preset

    assert apply_preset("jetson-orin", None, None, None, target_params=8_000_000_000)[:3] == ("fp16", "tensorrt", "int4")
    assert apply_preset("jetson-orin", None, None, None, target_params=135_000_000)[:3] == ("fp16", "tensorrt", None)
    assert apply_preset("jetson-orin", "fp32", None, None, target_params=10**10)[:3] == ("fp32", "tensorrt", "int4")
    assert apply_preset(None, None, None, None, target_params=10**10)[:3] == ("fp32", "ort", None)
    with pytest.raises(UserError, match="drop --variant ort"):
        _export_variant(tmp_path, tiny_llama, device="jetson-orin", variant="ort")
    with pytest.raises(UserError, match="int4 only"):
        _export_variant(tmp_path, tiny_llama, device="jetson-orin", quantize="int8")
    with pytest.raises(UserError, match="unknown --device"):
        _export_variant(tmp_path, tiny_llama, device="jetson-nano")
    assert not (tmp_path / "out").exists()
    out = _export_variant(tmp_path, tiny_llama, device="jetson-orin")
    manifest = json.loads((out / "dflash_edge.json").read_text())
    assert manifest["variant"] == "tensorrt" and manifest["target"]["dtype"] == "fp16"


def test_an_export_killed_at_any_step_leaves_no_folder_a_runtime_accepts(tmp_path, tiny_llama):
    import shutil
    import signal
    import subprocess
    import sys

    from dflash_edge.errors import UserError
    from dflash_edge.manifest import read_manifest

    hf_dir, drafter_dir, _ = tiny_llama
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dflash_edge.export.cli", "--model", str(hf_dir), "--drafter", str(drafter_dir),
           "--output", str(out)]
    step, total = 1, None
    while total is None or step <= total:  # kill it as it starts step 1, 2, ... of all of them
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            if line.startswith(f"[{step}/"):
                total = int(line.split("/", 1)[1].split("]", 1)[0])
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        assert total is not None, "the export printed no steps"
        if out.exists():
            # The last step takes milliseconds: the kill may land after the rename, and then the folder is whole.
            assert step == total and read_manifest(out) and ExportedModel(out).has_drafter
            shutil.rmtree(out)
        else:
            assert proc.returncode == -signal.SIGKILL, f"the export finished before step {step}"
        step += 1
        for left in tmp_path.iterdir():
            with pytest.raises(UserError):
                read_manifest(left)
    # The next export cleans up what the killed ones left and writes a complete folder.
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert read_manifest(out)["format_version"] >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
