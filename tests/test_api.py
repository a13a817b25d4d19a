"""The embedding API: streaming (iterator and callback), cancelling from another thread, one generation
at a time per model, errors before any thread starts."""
import threading

import pytest

from dflash_edge.errors import UserError
from dflash_edge.runtime.api import DFlashModel


@pytest.fixture(scope="module")
def app_model(tiny_llama):
    return DFlashModel(tiny_llama[2])


def test_stream_yields_the_text_generate_returns(app_model):
    whole = app_model.generate("the cat sat", max_new_tokens=40)
    got = []
    gen = app_model.stream("the cat sat", max_new_tokens=40, on_text=got.append)
    pieces = list(gen)
    assert "".join(pieces) == "".join(got) == whole.text
    result = gen.result()
    assert result.token_ids == whole.token_ids and result.stats.finish_reason == whole.stats.finish_reason
    assert gen.done


def test_cancel_from_another_thread_stops_after_the_current_round(app_model):
    """The worker is held inside its first round's callback until the main thread has cancelled, so the
    generation cannot finish first (a race the old version of this test allowed for)."""
    started, cancelled = threading.Event(), threading.Event()

    def hold(_):
        started.set()
        assert cancelled.wait(30)

    gen = app_model.stream("the cat sat", max_new_tokens=400, block_size=1, on_text=hold)
    assert started.wait(30)
    gen.cancel()
    cancelled.set()
    result = gen.result(timeout=30)
    assert result.stats.finish_reason == "cancelled"
    assert 1 <= len(result.token_ids) <= 2  # the round under way, at most one more piece's worth


def test_cancel_inside_the_callback_is_deterministic(app_model):
    cancel = threading.Event()
    result = app_model.generate("the cat sat", max_new_tokens=50, block_size=1, on_text=lambda _: cancel.set(),
                                cancel=cancel)
    assert result.stats.finish_reason == "cancelled" and len(result.token_ids) == 1


def test_leaving_the_iterator_cancels_the_generation(app_model):
    """Breaking out of the loop closes the iterator (CPython does it when the loop lets go of it), which
    cancels; the worker waits in its callback until then, so it cannot finish all 400 tokens first."""
    released = threading.Event()
    gen = app_model.stream("the cat sat", max_new_tokens=400, block_size=1, on_text=lambda _: released.wait(30))
    for _ in gen:
        break
    released.set()
    result = gen.result(timeout=30)
    assert result.stats.finish_reason == "cancelled" and 1 <= len(result.token_ids) <= 2


def test_on_done_gets_the_result_or_the_error_once(app_model):
    """on_done runs on the worker once the generation has ended, however it ended (the server leaves its
    queue from it, so a missed or doubled call would stall or overrun the queue)."""
    calls = []

    def on_done(result, error):
        calls.append((result, error, threading.current_thread().name))

    gen = app_model.stream("the cat sat", max_new_tokens=10, on_done=on_done)
    result = gen.result(timeout=60)
    assert calls == [(result, None, "dflash-generate")]  # the very object result() returns
    assert result.token_ids == app_model.generate("the cat sat", max_new_tokens=10).token_ids

    calls.clear()
    gen = app_model.stream("the cat sat", max_new_tokens=10, block_size=99, on_done=on_done)  # fails in the worker
    with pytest.raises(UserError, match="block") as raised:
        gen.result(timeout=60)
    assert calls == [(None, raised.value, "dflash-generate")]

    calls.clear()  # cancelled: a result all the same, with its reason
    cancelled = threading.Event()
    gen = app_model.stream("the cat sat", max_new_tokens=400, block_size=1, on_text=lambda _: cancelled.wait(30),
                           on_done=on_done)
    gen.cancel()
    cancelled.set()
    result = gen.result(timeout=60)
    assert calls == [(result, None, "dflash-generate")] and result.stats.finish_reason == "cancelled"


def test_concurrent_streams_do_not_mix(app_model):
    prompts = ["the cat sat", "a dog ran to the big red mat", "hello world"]
    expected = [app_model.generate(p, max_new_tokens=30).text for p in prompts]
    gens = [app_model.stream(p, max_new_tokens=30) for p in prompts]
    assert ["".join(g) for g in gens] == expected


def test_bad_input_raises_before_any_thread_starts(app_model):
    before = threading.active_count()
    with pytest.raises(UserError, match="empty"):
        app_model.stream("   ")
    with pytest.raises(UserError, match="top_p"):
        app_model.stream("hi", top_p=0.0)
    assert threading.active_count() == before


def test_worker_errors_reach_the_caller(app_model):
    gen = app_model.stream("the cat sat", max_new_tokens=10, block_size=99)  # above the drafter's size
    with pytest.raises(UserError, match="block"):
        list(gen)
    with pytest.raises(UserError):
        gen.result()


def test_the_readme_example_runs_as_written(tiny_llama, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = readme.split("From Python (numpy, onnxruntime and tokenizers only")[1].split("```python\n")[1].split("```")[0]
    assert 'load("exports/smollm2-135m")' in code
    exec(compile(code.replace("exports/smollm2-135m", str(tiny_llama[2])), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].strip() in ("stop", "length")
