"""Reading the jsonl files users hand to the command lines, with one clear line for a broken row."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed row) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            yield n, row
