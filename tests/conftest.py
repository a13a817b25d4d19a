import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dflash_edge.bench.synthetic import save_random_drafter, save_target  # noqa: E402


def _export(tmp_path_factory, arch: str, block_size: int = 16):
    from dflash_edge.export.pipeline import export

    root = tmp_path_factory.mktemp(f"tiny-{arch}")
    target = save_target(root / "hf", arch)
    drafter = save_random_drafter(root / "drafter", target, block_size=block_size)
    out = export(str(target), str(root / "onnx"), drafter=str(drafter), log=lambda *a: None)
    return target, drafter, out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(HF folder, drafter folder, exported folder) for a random Llama with a random drafter."""
    return _export(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return _export(tmp_path_factory, "qwen3")


@pytest.fixture(params=["llama", "qwen3"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")
