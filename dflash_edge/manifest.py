"""The exported folder's manifest (dflash_edge.json): written by the exporter, checked by the runtime.

Torch-free on purpose: the runtime imports it.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import UserError

MANIFEST_NAME = "dflash_edge.json"
FORMAT_NAME = "dflash-edge"
# 2: present.* holds the new positions only; the runtime owns the cache buffer (1: past + new).
# 3: value caches are stored transposed, [1, kv, d, slots], so attention streams the cache once.
# 4: the graphs write new K/V into the cache buffers themselves (slot = position), bound in place, and the
#    target returns its argmax: on a GPU the caches never leave the device.
FORMAT_VERSION = 4
OLDER_FORMATS = {1: "whose graphs copy the whole KV cache every step",
                 2: "whose attention reads the KV cache more than once per step",
                 3: "whose KV caches are written by the host, which keeps them off the GPU"}


def write_manifest(folder: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str | Path) -> dict:
    """Read and check a manifest; every problem is a UserError naming the folder and the fix."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass the folder dflash-export wrote")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{folder} is not a dflash-edge export (no {MANIFEST_NAME}); "
                        f"create one with: dflash-export --model <model> --output {folder}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is unreadable or corrupted ({e}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a dflash-edge manifest")
    version = manifest.get("format_version")
    if version in OLDER_FORMATS:
        raise UserError(f"{path} was written by an older dflash-edge (format {version}, "
                        f"{OLDER_FORMATS[version]}); export the model again")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} has format version {version}, this dflash-edge reads up to "
                        f"{FORMAT_VERSION}; upgrade dflash-edge or export again with this version")
    for key in ("target", "tokenizer", "stop_token_ids"):
        if key not in manifest:
            raise UserError(f"{path} lacks '{key}'; export the model again")
    if not isinstance(manifest["target"], dict):
        raise UserError(f"{path}: 'target' must be an object; export the model again")
    shared = manifest.get("shared_weights")
    if shared is not None and not (isinstance(shared, dict) and isinstance(shared.get("tensors"), dict)):
        raise UserError(f"{path}: 'shared_weights' must be an object with a file and its tensors; export again")
    drafter = manifest.get("drafter")
    check_drafter(path, drafter)
    for name in graph_files(manifest):
        if not inside(folder, name, path).is_file():
            raise UserError(f"{folder} lacks {name} (an interrupted copy?); export the model again")
    if drafter and "config" in drafter:  # drafter/config.json documents the drafter; optional, but kept inside
        inside(folder, drafter["config"], path)
    return manifest


def inside(folder: Path, name, manifest_path: Path | None = None) -> Path:
    """folder / name, refused unless it stays inside folder.

    A downloaded export is untrusted: a name like "../../.ssh/id_rsa", "/etc/passwd" or a symlink out of
    the folder would otherwise load any file the user can read into a graph, whose output becomes text."""
    where = manifest_path or folder / MANIFEST_NAME
    if not isinstance(name, str) or not name:
        raise UserError(f"{where} names a file as {name!r}, not a file name; export the model again")
    # Both spellings: on Windows "C:\\x" and "\\x" are absolute, and either separator can hide a "..".
    parts = set(PurePosixPath(name).parts) | set(PureWindowsPath(name).parts)
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor or ".." in parts:
        raise UserError(f"{where} names {name!r}, outside its folder; refusing to load it")
    try:
        root = folder.resolve()
        target = (folder / name).resolve()  # follows symlinks, so a link pointing out is caught here
    except (OSError, ValueError, RuntimeError) as e:  # a NUL in the name, a symlink loop
        raise UserError(f"{where} names {name!r}, which cannot be resolved ({e}); export the model again") from None
    if not target.is_relative_to(root):
        raise UserError(f"{where} names {name!r}, a link to a file outside its folder; refusing to load it")
    return target


def _count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_drafter(where: Path, drafter) -> None:
    """The manifest's drafter entry, checked field by field so that a bad one is one line, not a traceback."""
    if drafter is None:
        return
    if not isinstance(drafter, dict):
        raise UserError(f"{where}: 'drafter' must be an object; export the model again")
    for key, low in (("block_size", 1), ("mask_token_id", 0), ("num_layers", 1), ("num_kv_heads", 1),
                     ("head_dim", 1)):
        if not _count(drafter.get(key), low):
            raise UserError(f"{where}: drafter.{key} must be an integer >= {low}, got {drafter.get(key)!r}; "
                            f"export the model again")
    if "draft_vocab_size" in drafter and not _count(drafter["draft_vocab_size"], 1):
        raise UserError(f"{where}: drafter.draft_vocab_size must be an integer >= 1; export the model again")
    io = drafter.get("io")
    ok = isinstance(io, dict) and isinstance(io.get("context"), dict) and all(
        isinstance(io["context"].get(k), list) and all(isinstance(n, str) for n in io["context"][k])
        for k in ("inputs", "outputs"))
    if not ok:
        raise UserError(f"{where}: drafter.io.context must list its input and output names; export the model again")


def graph_files(manifest: dict) -> list:
    # .get: a missing name reaches inside() as None and is refused there in one line.
    files = [manifest["target"].get("graph"), manifest["tokenizer"]]
    shared = manifest.get("shared_weights")
    if shared:
        files.append(shared.get("file"))
    drafter = manifest.get("drafter")
    if drafter:
        files += [drafter.get("context_graph"), drafter.get("block_graph")]
    return files
