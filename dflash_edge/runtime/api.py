"""The Python API for apps: load an exported folder once, then generate from a prompt or chat messages."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from .chat import render_chat
from .generate import GenerationStats, generate
from .model import ExportedModel
from .tokenizer import StreamDecoder

Messages = Sequence[dict]  # [{"role": "user", "content": "..."}, ...]


@dataclass
class Result:
    text: str
    token_ids: list[int]   # generated ids, the stop token included when one ended the reply
    stats: GenerationStats


class DFlashModel:
    """An exported folder, loaded once. DFlash is used whenever the folder has a drafter."""

    def __init__(self, folder: str | Path, provider: str = "cpu", fallback: bool = False,
                 threads: int | None = None, use_drafter: bool = True):
        self.model = ExportedModel(folder, provider, fallback, threads, load_drafter=use_drafter)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def prompt_ids(self, prompt: str | Messages, system: str | None = None, raw: bool = False) -> list[int]:
        """Token ids for a user message (chat template applied), chat messages, or raw text."""
        if isinstance(prompt, str):
            if raw:
                return self.model.tokenizer.encode(prompt)
            messages = ([("system", system)] if system else []) + [("user", prompt)]
        else:
            messages = [(m["role"], m["content"]) for m in prompt]
        if not self.model.chat:
            raise UserError(f"{self.model.folder} has no chat template; pass raw=True (--raw) to send text as is")
        if not messages or not any(content.strip() for _, content in messages):
            raise UserError("the prompt is empty")
        return self.model.tokenizer.encode(render_chat(self.model.chat, messages))

    def generate(self, prompt: str | Messages, max_new_tokens: int = 256, block_size: int | None = None,
                 system: str | None = None, raw: bool = False,
                 on_text: Callable[[str], None] | None = None) -> Result:
        """Greedy reply. block_size 1 decodes plainly, N drafts N - 1 tokens a round; None (the default)
        picks the size each round, up to the drafter's trained size, from measured costs and acceptance."""
        ids = self.prompt_ids(prompt, system, raw)
        stream = StreamDecoder(self.model.tokenizer) if on_text else None
        on_tokens = (lambda new: on_text(stream.push(new))) if on_text else None
        out, stats = generate(self.model, ids, max_new_tokens, block_size, on_tokens=on_tokens)
        return Result(self.model.tokenizer.decode(out), out, stats)


def load(folder: str | Path, **kwargs) -> DFlashModel:
    return DFlashModel(folder, **kwargs)
