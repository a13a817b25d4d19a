"""Target-written replies kept as compressed token-id shards that accumulate over many runs.

A data folder holds `manifest.json` and `shard-NNNNN.npz` files. A shard holds, for each sequence, the
chat-templated prompt followed by the target's reply, as token ids:
  tokens          uint16 (uint32 for vocabularies above 65,536), every sequence back to back
  offsets         int64 [n + 1], where each sequence starts
  prompt_lengths  int32 [n], the prompt's share of each sequence (the reply is the supervised part)
  prompt_ids      uint64 [n], a hash of the conversation, so that a rerun skips prompts already answered
The manifest records for every shard its checksum, sizes, prompt sources, the command, the target, the
machine and the dates. Features never go here: a feature pass recomputes them from the ids.

Appending is atomic: the open shard is rewritten to a temporary name and renamed after every batch, then
the manifest the same way, so an interrupted run loses at most the batch in flight. A shard file that the
manifest does not list (the run stopped between the two renames) is ignored and overwritten later.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"


def conversation_id(conversation: list[dict]) -> int:
    """A stable 64-bit id for a conversation (role and content of each turn)."""
    canon = json.dumps([[m["role"], m["content"]] for m in conversation], ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(canon.encode("utf-8")).digest()[:8], "little")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def machine() -> dict:
    """What ran the regeneration: the replies of an fp32 CPU and a bf16 GPU can differ in a few tokens."""
    from ..machine import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "system": platform.system(), "python": platform.python_version()}


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a shard folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{path}: unknown shard format (this dflash-edge reads format {FORMAT})")
    return manifest


@dataclass
class ShardData:
    tokens: np.ndarray
    offsets: np.ndarray
    prompt_lengths: np.ndarray
    prompt_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def sequence(self, i: int) -> tuple[list[int], int]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist(), int(self.prompt_lengths[i])


def _load_shard(folder: Path, entry: dict) -> ShardData:
    name = entry.get("file", "")
    path = folder / name
    if not name or Path(name).name != name or not path.is_file():
        raise UserError(f"{folder / MANIFEST} lists a shard {name!r} that is not a file in that folder")
    if file_sha256(path) != entry.get("sha256"):
        raise UserError(f"{path} does not match its checksum in {MANIFEST} (changed or truncated)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = ShardData(z["tokens"], z["offsets"], z["prompt_lengths"], z["prompt_ids"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a readable shard ({e})") from None
    n = len(data.prompt_lengths)
    if (len(data.offsets) != n + 1 or len(data.prompt_ids) != n or data.offsets[0] != 0
            or data.offsets[-1] != len(data.tokens) or np.any(np.diff(data.offsets) <= data.prompt_lengths)):
        raise UserError(f"{path}: its offsets, prompt lengths and ids disagree")
    return data


def read_shards(folders: list[Path], vocab_size: int | None = None) -> list[ShardData]:
    """Every shard listed in the folders' manifests, checked."""
    shards = []
    for folder in folders:
        for entry in read_manifest(folder)["shards"]:
            data = _load_shard(folder, entry)
            if vocab_size is not None and len(data.tokens) and int(data.tokens.max()) >= vocab_size:
                raise UserError(f"{folder / entry['file']} holds token ids beyond the target's vocab ({vocab_size}): "
                                f"written for another target ({entry.get('target', {}).get('name', '?')})")
            shards.append(data)
    return shards


def shard_entries(folders: list[Path]) -> list[dict]:
    """The manifests' shard entries (no shard is opened)."""
    return [e for folder in folders for e in read_manifest(folder)["shards"]]


def answered_ids(folder: Path) -> set[int]:
    """Conversation ids already in the folder's shards (empty for a new folder)."""
    if not (folder / MANIFEST).is_file():
        return set()
    shards = read_shards([folder])
    return {int(i) for s in shards for i in s.prompt_ids}


@dataclass
class ShardWriter:
    """Appends batches of (conversation id, prompt ids, reply ids, source) to a shard folder."""

    folder: Path
    info: dict                               # command, target, generation settings, prompts file
    vocab_size: int
    shard_sequences: int = 1024              # a shard closes at this many sequences
    _entry: dict | None = field(default=None, init=False)
    _rows: list = field(default_factory=list, init=False)

    def __post_init__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / MANIFEST
        self.manifest = read_manifest(self.folder) if path.is_file() else {"format": FORMAT, "shards": []}
        self.dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    def _new_entry(self) -> dict:
        taken = {e["file"] for e in self.manifest["shards"]}
        n = len(self.manifest["shards"])
        while f"shard-{n:05d}.npz" in taken:
            n += 1
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return {"file": f"shard-{n:05d}.npz", **self.info, "machine": machine(), "started": now}

    def append(self, rows: list[tuple[int, list[int], list[int], str]]) -> None:
        if not rows:
            return
        if self._entry is None or len(self._rows) >= self.shard_sequences:
            self._entry, self._rows = self._new_entry(), []
            self.manifest["shards"].append(self._entry)
        self._rows += rows
        seqs = [p + r for _, p, r, _ in self._rows]
        arrays = {
            "tokens": np.fromiter((t for s in seqs for t in s), dtype=self.dtype),
            "offsets": np.cumsum([0] + [len(s) for s in seqs], dtype=np.int64),
            "prompt_lengths": np.array([len(p) for _, p, _, _ in self._rows], dtype=np.int32),
            "prompt_ids": np.array([i for i, *_ in self._rows], dtype=np.uint64),
        }
        path = self.folder / self._entry["file"]
        write_atomic(path, lambda f: np.savez_compressed(f, **arrays))
        self._entry.update({
            "sha256": file_sha256(path), "sequences": len(self._rows), "tokens": int(len(arrays["tokens"])),
            "reply_tokens": sum(len(r) for _, _, r, _ in self._rows),
            "sources": dict(Counter(src for *_, src in self._rows)),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        text = json.dumps(self.manifest, indent=1, ensure_ascii=False) + "\n"
        write_atomic(self.folder / MANIFEST, lambda f: f.write(text.encode("utf-8")))


def summary(folders: list[Path]) -> dict:
    """Totals over the manifests (no shard is opened)."""
    total = Counter()
    for e in shard_entries(folders):
        total["shards"] += 1
        total.update({k: e.get(k, 0) for k in ("sequences", "tokens", "reply_tokens")})
    return dict(total)
