"""The Jetson budget: its arithmetic reproduces the models' published sizes, and the guide shows it as computed."""
from pathlib import Path

from dflash_edge.export.devices import SETUPS, SHAPES, budget_table

GUIDE = Path(__file__).resolve().parent.parent / "samples" / "jetson" / "README.md"


def test_shapes_reproduce_the_published_parameter_counts():
    published = {"Llama-3.1-8B": 8.03e9, "Qwen3-4B": 4.02e9, "SmolLM2-135M": 134.5e6}
    for name, count in published.items():
        s = SHAPES[name]
        params = s.layers * s.layer_params() + s.vocab * s.hidden * (1 if s.tied else 2)
        assert abs(params / count - 1) < 0.005, name  # norms are the only parameters left out


def test_int4_shrinks_the_projections_but_not_the_shared_vocab_matrices():
    int4, fp16 = (next(s for s in SETUPS if s.label == f"Qwen3-4B {p} + drafter") for p in ("int4", "fp16"))
    assert int4.drafter_gb() == fp16.drafter_gb()
    vocab_gb = 151936 * 2560 * 2 / 1e9
    assert abs((fp16.target_gb() - vocab_gb) / (int4.target_gb() - vocab_gb) - 2 / (0.5 + 2 / 32)) < 1e-9


def test_the_jetson_guide_shows_the_budget_as_computed():
    text = GUIDE.read_text()
    shown = text.split("<!-- budget:start -->\n")[1].split("\n<!-- budget:end -->")[0]
    assert shown == budget_table(), "regenerate with: python -m dflash_edge.export.devices"
