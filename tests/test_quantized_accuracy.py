"""A quantized target is a different target: how often it makes fp32's choice, with a stated floor.

DFlash on a quantized export equals that export's own plain decoding (tests/test_export.py), which says
nothing about whether the quantized model is any good: a quantizer that wrote garbage would pass those
tests. Here each quantized export of the real SmolLM2 (the wheel's Q4_1 GGUF dequantized to fp32 is the
reference) is run teacher-forced along fp32's greedy replies, and the share of positions where its greedy
choice equals fp32's next token must stay above a floor. Counting every position, not the common prefix,
keeps one early near-tie from deciding the result.

Measured on 2026-12-03 (4 prompts x 64 tokens, 2-core AMD EPYC): int8 250/256 (97.7 %), int8-tokens
241/256 (94.1 %), int4 190/256 (74.2 %). The floors sit a few points under these, so a change in the
quantizers' rounding passes while a broken scale, block layout or zero point (which drops agreement to
near chance) fails.
"""
import pytest

from dflash_edge.runtime.api import DFlashModel
from dflash_edge.runtime.generate import generate
from test_smollm2 import PROMPTS as SMOLLM2_PROMPTS

pytestmark = pytest.mark.smollm2

PROMPTS = SMOLLM2_PROMPTS[:4]  # the prompts the floors below were measured on
TOKENS = 64
FLOOR = {"int8": 0.95, "int8-tokens": 0.90, "int4": 0.65}


def _export(root, quantize):
    from dflash_edge.export.pipeline import export

    return export("smollm2-135m", str(root / (quantize or "fp32")), drafter="", quantize=quantize,
                  log=lambda *a: None)


@pytest.fixture(scope="module")
def fp32_replies(tmp_path_factory):
    """The root folder and fp32's greedy replies [(prompt ids, reply ids)], run to TOKENS past any stop."""
    root = tmp_path_factory.mktemp("quantized-accuracy")
    model = DFlashModel(_export(root, None), use_drafter=False)
    model.model.stop_token_ids = set()
    replies = []
    for prompt in PROMPTS:
        ids = model.prompt_ids(prompt)
        reply, _ = generate(model.model, ids, TOKENS, block_size=1)
        replies.append((ids, reply))
    return root, replies


def same_choices(model, ids: list[int], reply: list[int]) -> int:
    """Positions of reply where model's greedy choice, given fp32's reply so far, is fp32's next token."""
    cache = model.new_target_cache(len(ids) + len(reply))
    choices = model.run_target(ids + reply, cache, last_only=False).next_ids[len(ids) - 1:-1]
    return sum(int(c) == t for c, t in zip(choices, reply, strict=True))


@pytest.mark.parametrize("quantize", list(FLOOR))
def test_a_quantized_target_mostly_makes_fp32s_choice(fp32_replies, quantize):
    root, replies = fp32_replies
    model = DFlashModel(_export(root, quantize), use_drafter=False)
    agree = sum(same_choices(model.model, ids, reply) for ids, reply in replies)
    total = sum(len(reply) for _, reply in replies)
    assert agree / total >= FLOOR[quantize], f"{quantize} makes fp32's choice at {agree}/{total} positions"
