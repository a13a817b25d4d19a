"""Reading the jsonl files users hand to the command lines, with one clear line for a broken row."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed row) for every non-blank line."""
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{n} is not valid UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n} is not valid JSON ({e.msg})") from None
                yield n, row
    except (IsADirectoryError, PermissionError) as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
