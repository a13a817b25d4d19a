"""The exported folder's manifest (dflash_edge.json): written by the exporter, checked by the runtime.

Torch-free on purpose: the runtime imports it.
"""
from __future__ import annotations

import json
from pathlib import Path

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
    for name in graph_files(manifest):
        if not (folder / name).is_file():
            raise UserError(f"{folder} lacks {name} (an interrupted copy?); export the model again")
    return manifest


def graph_files(manifest: dict) -> list[str]:
    files = [manifest["target"]["graph"], manifest["tokenizer"]]
    shared = manifest.get("shared_weights")
    if shared:
        files.append(shared["file"])
    drafter = manifest.get("drafter")
    if drafter:
        files += [drafter["context_graph"], drafter["block_graph"]]
    return files
