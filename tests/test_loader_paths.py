"""A hostile export folder cannot make the loaders read files outside it, and a malformed manifest entry is
one line (UserError), never a traceback from numpy or a file mapped from somewhere else."""
import json
import os
import shutil

import pytest

from dflash_edge.errors import UserError
from dflash_edge.manifest import MANIFEST_NAME, read_manifest
from dflash_edge.runtime.session import SharedWeights


@pytest.fixture
def folder(tiny_llama, tmp_path):
    """A copy of the tiny export (so tests may edit it) next to a file it must never read."""
    out = tmp_path / "export"
    shutil.copytree(tiny_llama[2], out)
    (tmp_path / "secret.bin").write_bytes(b"TOP-SECRET-FILE-CONTENT!" * 2000)
    return out


def edit(folder, change) -> dict:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


def refused(folder, needle: str) -> str:
    with pytest.raises(UserError) as e:
        read_manifest(folder)
    message = str(e.value)
    assert needle in message and "\n" not in message, message
    return message


def test_the_unchanged_copy_loads(folder):
    from dflash_edge.runtime.model import ExportedModel

    assert ExportedModel(folder, threads=1).tokenizer.encode("the cat")


@pytest.mark.parametrize("name", ["../secret.bin", "sub/../../secret.bin", "..\\secret.bin", "{abs}",
                                  "C:\\Windows\\win.ini"])
@pytest.mark.parametrize("key", ["tokenizer", "target.graph", "shared_weights.file", "drafter.block_graph",
                                 "drafter.context_graph", "drafter.config"])
def test_manifest_paths_outside_the_folder_are_refused(folder, key, name):
    name = name.format(abs=folder.parent / "secret.bin")

    def change(m):
        *parents, last = key.split(".")
        entry = m
        for p in parents:
            entry = entry[p]
        entry[last] = name

    edit(folder, change)
    refused(folder, "outside its folder")


def test_a_symlink_out_of_the_folder_is_refused(folder):
    (folder / "tokenizer.json").unlink()
    os.symlink(folder.parent / "secret.bin", folder / "tokenizer.json")
    refused(folder, "link to a file outside")
    # The loader itself checks too, not only read_manifest: the tokenizer path it opens is the same.
    from dflash_edge.runtime.model import ExportedModel

    with pytest.raises(UserError, match="outside"):
        ExportedModel(folder, threads=1)


def test_a_symlink_inside_the_folder_is_allowed(folder):
    (folder / "tokenizer.json").rename(folder / "tok-real.json")
    os.symlink("tok-real.json", folder / "tokenizer.json")
    read_manifest(folder)


def test_shared_weights_cannot_map_a_file_outside(folder):
    """SharedWeights memory-maps its file straight into the graphs, past ORT's external-data checks."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    index = dict(manifest["shared_weights"], file="../secret.bin")
    with pytest.raises(UserError, match="outside its folder"):
        SharedWeights(folder, index)


@pytest.mark.parametrize("field, value, needle", [
    ("dtype", "O", "not a numeric type"),
    ("dtype", "no-such-type", "not a numeric type"),
    ("dtype", None, "not a numeric type"),
    ("offset", -4096, "offset and length"),
    ("length", "37376", "offset and length"),
    ("shape", [2**40, 2**40], "different size"),
    ("shape", ["146", 64], "non-negative integers"),
    ("shape", [-146, -64], "non-negative integers"),
    ("offset", 1 << 30, "truncated"),
    ("graphs", "drafter_block.onnx", "graphs"),
])
def test_bad_shared_weights_entries_are_one_line(folder, field, value, needle):
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    index = manifest["shared_weights"]
    entry = next(iter(index["tensors"].values()))
    entry[field] = value
    with pytest.raises(UserError) as e:
        SharedWeights(folder, index)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("field, value", [("block_size", "16"), ("block_size", 0), ("num_kv_heads", 0),
                                          ("head_dim", 1.5), ("mask_token_id", -1), ("num_layers", True),
                                          ("io", {"context": {"inputs": "x"}})])
def test_bad_drafter_entries_are_one_line(folder, field, value):
    edit(folder, lambda m: m["drafter"].__setitem__(field, value))
    refused(folder, f"drafter.{field}")


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.__setitem__("target", "target.onnx"), "'target' must be an object"),
    (lambda m: m["target"].pop("graph"), "not a file name"),
    (lambda m: m.__setitem__("shared_weights", {"file": "shared_weights.data"}), "shared_weights"),
    (lambda m: m.__setitem__("tokenizer", 7), "not a file name"),
])
def test_malformed_manifest_entries_are_one_line(folder, change, needle):
    edit(folder, change)
    refused(folder, needle)


def test_a_name_that_cannot_be_resolved_is_one_line(folder):
    edit(folder, lambda m: m.__setitem__("tokenizer", "tokenizer\x00.json"))
    refused(folder, "cannot be resolved")
