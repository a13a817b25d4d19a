"""Long runs stay bounded, and the request and prompt paths take any input without a crash."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dflash_edge.errors import UserError
from dflash_edge.runtime.api import DFlashModel
from dflash_edge.runtime.server import BadRequest, Request


@pytest.fixture(scope="module")
def app(tiny_llama):
    return DFlashModel(tiny_llama[2])


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_generating_to_the_full_context_stops_with_length(tiny_llama):
    app = DFlashModel(tiny_llama[2])
    app.model.stop_token_ids = set()  # nothing but the context may end it
    ids = app.prompt_ids("the cat sat", raw=True)
    for asked in (app.model.max_context - len(ids), 10**6):  # exactly the room left, and far more
        result = app.generate("the cat sat", max_new_tokens=asked, raw=True)
        assert result.stats.finish_reason == "length"
        assert len(ids) + len(result.token_ids) == app.model.max_context


def settled_rss_mb() -> float:
    """RSS once glibc has handed its free heap pages back, so that what is left is memory in use: free
    pages the allocator keeps would otherwise move the reading by megabytes either way."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading is noisier, the bound still holds a real leak
        pass
    return rss_mb()


# A leak of LEAK_MB per generation must fail: the bound is a quarter of what that many leaks would add.
LEAK_MB = 1.0
GENERATIONS = 40


def test_memory_stays_flat_over_back_to_back_generations(tiny_llama):
    app = DFlashModel(tiny_llama[2])
    app.model.stop_token_ids = set()  # every generation runs its full 100 tokens, sampled or greedy
    for i in range(4):  # warm-up: sessions' arenas and caches reach their working size on both paths
        app.generate(f"the cat sat {i}", max_new_tokens=100, raw=True, temperature=0.8 if i % 2 else 0.0, seed=i)
    before = settled_rss_mb()
    for i in range(GENERATIONS):
        result = app.generate(f"the dog ran {i}", max_new_tokens=100, raw=True, temperature=0.8 if i % 2 else 0.0,
                              seed=i)
        assert result.stats.new_tokens == 100
    grown = settled_rss_mb() - before
    bound = GENERATIONS * LEAK_MB / 4
    assert grown < bound, (f"RSS grew {grown:.1f} MB over {GENERATIONS} generations (bound {bound:.0f} MB: "
                           f"a leak of {LEAK_MB / 4:.2f} MB a generation)")


class FakeServer:
    def __init__(self, model):
        self.model = model


scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=40)
nested = scalars | st.lists(scalars, max_size=4) | st.dictionaries(st.text(max_size=10), scalars, max_size=4)
json_values = nested | st.lists(nested, max_size=3) | st.dictionaries(st.text(max_size=10), nested, max_size=3)
request_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", 3]), "content": st.one_of(st.text(), json_values)}),
            max_size=3)),
        "prompt": st.one_of(st.text(), json_values),
        "max_tokens": json_values, "temperature": json_values, "top_p": json_values, "top_k": json_values,
        "seed": json_values, "stream": json_values, "n": json_values, "stream_options": json_values}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=request_bodies, chat=st.booleans())
def test_request_parser_accepts_or_refuses_cleanly(app, body, chat):
    """Any JSON body: a checked request, or BadRequest with a 4xx status. Nothing else escapes."""
    try:
        request = Request(FakeServer(app), body, chat)
    except BadRequest as e:
        assert 400 <= e.status < 500 and str(e)
        json.dumps({"error": {"message": str(e), "param": e.param}})  # what the server sends must serialise
        return
    assert 1 <= request.max_tokens < app.model.max_context
    assert len(request.ids) + request.max_tokens <= app.model.max_context


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300))
def test_prompt_path_takes_any_text(app, text):
    try:
        ids = app.prompt_ids(text)
    except UserError as e:
        assert "empty" in str(e) or "context" in str(e)
        return
    assert all(0 <= i < app.model.target_info["vocab_size"] for i in ids)
