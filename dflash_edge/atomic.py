"""Files that a crash or a power cut leaves either as they were or whole, never torn or empty.

A rename alone is not enough: after a power cut some filesystems keep the rename but not the data written
before it (an empty file under the new name), or lose the rename itself. So the data is synced before the
rename, and the folder after it. Torch-free, so any part of the package can use it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def sync_folder(folder: Path) -> None:
    """Make the renames inside `folder` durable."""
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals renames itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a finished file (written by other means, e.g. a memmap) onto `path`, data first."""
    fd = os.open(tmp, os.O_RDWR)  # Windows refuses to flush a file opened read-only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_folder(Path(path).parent)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(binary file) on a temporary file beside `path`, then put it in place durably.

    If `write` fails, `path` keeps its old content and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
