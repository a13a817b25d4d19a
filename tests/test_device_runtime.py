"""GPU-side runtime settings, checked on the CPU (review F9, F12, F16, F17, F18): the option dicts and session
options a GPU provider would get, the kept IOBindings, and prefill in pieces."""
import numpy as np
import pytest

from dflash_edge.errors import UserError
from dflash_edge.runtime.providers import PROVIDERS, cuda_options, gpu_mem_limit, provider_options
from dflash_edge.runtime.session import GPU_THREADS, session_options

FP32 = {"target": {"dtype": "fp32"}}
FP16 = {"target": {"dtype": "fp16"}}


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("DFLASH_TF32", raising=False)
    monkeypatch.delenv("DFLASH_GPU_MEM_LIMIT", raising=False)
    return monkeypatch


def test_cuda_options_keep_fp32_folders_out_of_tf32(clean_env):
    assert cuda_options(FP32) == {"arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}
    assert cuda_options(FP16)["use_tf32"] == "1"  # fp16 math is not TF32's business
    assert cuda_options(FP32, tf32=True)["use_tf32"] == "1"
    clean_env.setenv("DFLASH_TF32", "1")
    assert cuda_options(FP32)["use_tf32"] == "1"
    clean_env.setenv("DFLASH_TF32", "0")
    assert cuda_options(FP32)["use_tf32"] == "0"


def test_gpu_memory_limit_from_the_environment_or_a_parameter(clean_env):
    assert "gpu_mem_limit" not in cuda_options(FP32)
    assert cuda_options(FP32, mem_limit=1 << 30)["gpu_mem_limit"] == str(1 << 30)
    clean_env.setenv("DFLASH_GPU_MEM_LIMIT", "6G")
    assert cuda_options(FP32)["gpu_mem_limit"] == str(6 << 30)
    assert gpu_mem_limit("123456") == 123456 and gpu_mem_limit("512MiB") == 512 << 20
    assert gpu_mem_limit("1.5g") == 3 << 29 and gpu_mem_limit("") is None
    for bad in ("lots", "-1G", "0", "6X"):
        with pytest.raises(UserError, match="DFLASH_GPU_MEM_LIMIT"):
            gpu_mem_limit(bad)


def test_provider_options_give_cuda_its_options(clean_env, tmp_path):
    cuda = provider_options([PROVIDERS["cuda"], PROVIDERS["cpu"]], tmp_path, FP32, "target.onnx")
    assert cuda == [(PROVIDERS["cuda"], cuda_options(FP32)), PROVIDERS["cpu"]]
    assert provider_options([PROVIDERS["cpu"]], tmp_path, FP32, "target.onnx") == [PROVIDERS["cpu"]]


def test_gpu_sessions_get_few_threads_that_do_not_spin(tmp_path):
    graph = tmp_path / "target.onnx"
    for wanted in (PROVIDERS["cuda"], PROVIDERS["tensorrt"]):
        for threads in (None, 1, 16):
            options = session_options(graph, wanted, threads=threads, spin=True)
            assert options.intra_op_num_threads == min(threads or GPU_THREADS, GPU_THREADS)
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
            assert options.get_session_config_entry("session.use_device_allocator_for_initializers") == "1"
    cpu = session_options(graph, PROVIDERS["cpu"], threads=16, spin=True)
    assert cpu.intra_op_num_threads == 16  # the CPU provider keeps every core, and the target's pool spins
    for key in ("session.intra_op.allow_spinning", "session.use_device_allocator_for_initializers"):
        with pytest.raises(RuntimeError):  # not set: ORT's defaults
            cpu.get_session_config_entry(key)


def test_prefill_pieces_on_every_provider():
    from dflash_edge.runtime.model import PREFILL_CHUNK, prefill_chunk
    from dflash_edge.runtime.providers import TRT_PREFILL_CHUNK

    assert prefill_chunk(PROVIDERS["tensorrt"]) == TRT_PREFILL_CHUNK
    assert prefill_chunk(PROVIDERS["cuda"]) == prefill_chunk(PROVIDERS["cpu"]) == PREFILL_CHUNK == 512


@pytest.fixture(scope="module")
def model(tiny_llama):
    from dflash_edge.runtime.model import ExportedModel

    return ExportedModel(tiny_llama[2])


@pytest.mark.parametrize("on_host", [True, False])
def test_a_long_prompt_in_pieces_gives_the_same_token_and_cache(model, on_host):
    """F9: prefilling in pieces writes the same cache and predicts the same next token as one call."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.target_info["vocab_size"], size=300).tolist()
    results = []
    for chunk in (None, 64, 100):
        model.prefill_chunk = chunk
        cache = model.new_target_cache(1 if on_host else len(ids) + 8)
        step, pieces = model.prefill(ids, cache, logits=True, taps=True)
        assert cache.length == len(ids) and sum(n for _, n in pieces) == len(ids)
        taps = np.concatenate([t.numpy()[0] for t, _ in pieces])
        results.append((step, [tuple(np.array(a) for a in cache.layer(i)) for i in range(cache.num_layers)], taps))
    model.prefill_chunk = 512
    (whole, layers, taps), others = results[0], results[1:]
    for step, other_layers, other_taps in others:
        assert step.next_ids.tolist() == whole.next_ids.tolist()
        np.testing.assert_allclose(step.logits, whole.logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(other_taps, taps, rtol=1e-4, atol=1e-5)
        for (k, v), (k2, v2) in zip(layers, other_layers):
            np.testing.assert_allclose(k2, k, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(v2, v, rtol=1e-4, atol=1e-5)


def test_each_cache_keeps_one_binding_per_session_until_it_grows(model):
    """F16: the cache's buffers are bound once per session; growing them makes new bindings."""
    cache = model.new_target_cache(1)
    model.run_target([5, 6], cache, last_only=True)
    cache.commit(2)
    kept = dict(cache._bindings)
    assert len(kept) == 1
    model.run_target([7], cache, last_only=True)
    cache.commit(1)
    assert cache._bindings == kept  # the same binding object, not a new one
    capacity = cache.capacity
    step = model.run_target([1] * capacity, cache, last_only=False)  # past the capacity: the buffers grow
    assert cache.capacity > capacity and all(b is not kept_b for (_, b), (_, kept_b)
                                              in zip(cache._bindings.values(), kept.values()))
    # The same calls on a cache made big enough up front (never reallocated) give the same tokens.
    fresh = model.new_target_cache(4 * capacity)
    model.run_target([5, 6], fresh, last_only=True)
    fresh.commit(2)
    model.run_target([7], fresh, last_only=True)
    fresh.commit(1)
    assert model.run_target([1] * capacity, fresh, last_only=False).next_ids.tolist() == step.next_ids.tolist()


def test_kept_bindings_never_overwrite_taps_a_caller_still_holds(model):
    """The taps of one call must survive the next call on the same binding (the drafter reads them later)."""
    cache = model.new_target_cache(64)
    first = model.run_target([5, 6, 7], cache, last_only=False, logits=True, taps=True)
    held = first.taps.numpy().copy()
    cache.commit(3)
    second = model.run_target([8, 9], cache, last_only=False, logits=True, taps=True)
    np.testing.assert_array_equal(first.taps.numpy(), held)
    assert second.taps.shape() == [1, 2, model.tap_width] and first.logits.shape[0] == 3
    assert second.logits.shape == (2, model.target_info["vocab_size"])
    assert model.run_target([4], cache, last_only=True).logits is None  # another output set, another binding
    assert len(cache._bindings) == 2


def test_device_caches_grow_in_large_steps_instead_of_reserving_the_request(model, monkeypatch):
    """F8: the device path (simulated on the CPU) used to reserve prompt + max_new_tokens up front, which
    every step's attention then read; now it reserves the prompt and a verify, and grows by DEVICE_CHUNK
    (here 256, below the tiny model's 512 positions). Same tokens."""
    from dflash_edge.runtime.cache import KVCache
    from dflash_edge.runtime.generate import generate

    model.stop_token_ids = set()
    ids = model.tokenizer.encode("the cat sat on the mat")
    host, _ = generate(model, ids, 400, block_size=4)
    monkeypatch.setattr(KVCache, "DEVICE_CHUNK", 256)
    monkeypatch.setattr(model, "on_host", False)
    sizes = []
    real = KVCache.reserve

    def watched(self, n):
        real(self, n)
        sizes.append(self.capacity)

    monkeypatch.setattr(KVCache, "reserve", watched)
    device, _ = generate(model, ids, 400, block_size=4)
    assert device == host
    assert sizes[0] == 256  # prompt + one verify, rounded to the device step, not prompt + 400
    assert set(sizes) == {256, 512}  # grown once, by a whole device step
    # The cap: never past max_slots (TensorRT's largest profile), unless one call needs more.
    cache = KVCache(1, 1, 4, np.float32, step=1024, max_slots=640)
    cache.reserve(600)
    assert cache.capacity == 640
    cache.commit(600)
    cache.reserve(100)
    assert cache.capacity == 768  # 700 positions, rounded up to a CHUNK, not to a device step


def test_gpu_sessions_read_the_shared_file_as_external_data(tiny_llama):
    """F11: handing a GPU session the mapped matrices saves nothing (it uploads its own copy), so only CPU
    sessions get them as initializers; a GPU one reads shared_weights.data as ordinary external data, which
    the block graph points at anyway (a session built without them still loads)."""
    import json

    import onnxruntime as ort

    from dflash_edge.runtime.session import SharedWeights

    folder = tiny_llama[2]
    shared = SharedWeights(folder, json.loads((folder / "dflash_edge.json").read_text())["shared_weights"])
    block = folder / "drafter_block.onnx"
    handed = []
    real = shared.for_graph
    shared.for_graph = lambda graph: handed.append(graph) or real(graph)
    assert real(block.name)  # the block graph does read shared matrices
    session_options(block, PROVIDERS["cpu"], shared)
    assert handed == [block.name]
    gpu = session_options(block, PROVIDERS["cuda"], shared)
    assert handed == [block.name]  # not handed to the GPU session
    ort.InferenceSession(str(block), gpu, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("on_host", [True, False])
def test_double_buffered_caches_give_the_same_tokens(model, monkeypatch, on_host):
    """F6: under TensorRT the graphs write the caches into a second set of buffers, swapped after each call
    (an aliased input and output is not defined there). Forced on the CPU: plain and DFlash give the tokens
    of the in-place path, and the sets really alternate."""
    from dflash_edge.runtime.cache import KVCache
    from dflash_edge.runtime.generate import generate

    model.stop_token_ids = set()
    ids = model.tokenizer.encode("def sort list : return list . sort ( ) and print the big red list")
    expected = {block: generate(model, ids, 60, block_size=block)[0] for block in (1, 4)}
    monkeypatch.setattr(model, "double_buffer", True)
    monkeypatch.setattr(model, "on_host", on_host)
    swaps = []
    real = KVCache.written
    monkeypatch.setattr(KVCache, "written", lambda self: swaps.append(self.double) or real(self))
    for block, tokens in expected.items():
        assert generate(model, ids, 60, block_size=block)[0] == tokens
    assert swaps and all(swaps)


def test_a_long_prompt_hands_its_scratch_back_after_its_last_piece(model, monkeypatch):
    """Issue 30 H1: the arena keeps a long prefill's scratch (SmolLM2, 8,000 tokens: 2.46 GB held after the
    reply, 0.77 GB with this); only the last piece of a prompt over SHRINK_AFTER tokens asks to shrink."""
    from dflash_edge.runtime import model as runtime_model

    flags = []
    real = model.run_target

    def watched(ids, cache, last_only, logits=False, taps=False, shrink=False):
        flags.append((len(ids), shrink))
        return real(ids, cache, last_only, logits, taps, shrink)

    monkeypatch.setattr(model, "run_target", watched)
    monkeypatch.setattr(model, "prefill_chunk", 128)
    long_ids = [5] * 300
    model.prefill(long_ids, model.new_target_cache(len(long_ids)))
    assert flags == [(128, False), (128, False), (44, True)]
    flags.clear()
    model.prefill([5] * runtime_model.SHRINK_AFTER, model.new_target_cache(300))
    assert not any(shrink for _, shrink in flags)
