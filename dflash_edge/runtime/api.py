"""The Python API for apps: load an exported folder once, then generate from a prompt or chat messages.

generate() blocks and returns the reply; stream() runs the generation on a worker thread and hands back
a Generation to iterate for text pieces, cancel from any thread, or wait on. Generations on one model
run one at a time (a lock), so a GUI may start one from its event thread without sharing any state.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import UserError
from .chat import render_chat
from .generate import GenerationStats, generate
from .model import ExportedModel
from .sampling import Sampling
from .tokenizer import StreamDecoder

Messages = Sequence[dict]  # [{"role": "user", "content": "..."}, ...]


@dataclass
class Result:
    text: str
    token_ids: list[int]   # generated ids, the stop token included when one ended the reply
    stats: GenerationStats  # stats.finish_reason: "stop", "length" or "cancelled"


_END = object()


class Generation:
    """A generation running on a worker thread. Iterate it for text pieces as they are decoded;
    cancel() stops it after the current round (from any thread); result() waits for the Result."""

    def __init__(self, run: Callable[..., Result], on_text: Callable[[str], None] | None = None,
                 on_done: Callable[["Result | None", "BaseException | None"], None] | None = None):
        self._pieces: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None

        def push(piece: str) -> None:
            if piece:
                self._pieces.put(piece)
                if on_text:
                    on_text(piece)

        def work() -> None:
            try:
                self._result = run(on_text=push, cancel=self._cancel)
            except BaseException as e:  # handed to whoever waits: result() or the iterator re-raises it
                self._error = e
            finally:
                self._pieces.put(_END)
                if on_done:
                    on_done(self._result, self._error)

        self._thread = threading.Thread(target=work, name="dflash-generate", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        try:
            while (piece := self._pieces.get()) is not _END:
                yield piece
        finally:  # a consumer that stops reading (break, close) stops the generation too
            self._cancel.set()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> Result:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the generation is still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class DFlashModel:
    """An exported folder, loaded once. DFlash is used whenever the folder has a drafter."""

    def __init__(self, folder: str | Path, provider: str = "cpu", fallback: bool = False,
                 threads: int | None = None, use_drafter: bool = True):
        self.model = ExportedModel(folder, provider, fallback, threads, load_drafter=use_drafter)
        self._lock = threading.Lock()  # one generation at a time per model

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
                 system: str | None = None, raw: bool = False, on_text: Callable[[str], None] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 lookup: bool = True, cancel: threading.Event | None = None) -> Result:
        """The reply, blocking. Greedy at temperature 0 (the default), else sampled (top_p, top_k; seed
        for a reproducible draw); either way DFlash's output is distributed exactly as plain decoding's.
        block_size 1 decodes plainly, N drafts N - 1 tokens a round; None (the default) picks the size
        each round, up to the drafter's trained size, from measured costs and acceptance, and then also
        verifies drafts copied from earlier in the context where they pay more (lookup=False: the
        drafter's only). on_text gets the reply's text piece by piece; setting `cancel` stops it after
        the current round."""
        ids = self.prompt_ids(prompt, system, raw)
        sampling = Sampling(temperature, top_k, top_p, seed).check()
        stream = StreamDecoder(self.model.tokenizer) if on_text else None
        on_tokens = (lambda new: on_text(stream.push(new))) if on_text else None
        with self._lock:
            out, stats = generate(self.model, ids, max_new_tokens, block_size, on_tokens=on_tokens,
                                  sampling=sampling, lookup=lookup, cancel=cancel)
        return Result(self.model.tokenizer.decode(out), out, stats)

    def stream(self, prompt: str | Messages, max_new_tokens: int = 256, *,
               on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Result | None, BaseException | None], None] | None = None,
               **options) -> Generation:
        """Start generate(prompt, ...) on a worker thread and return at once. Bad input raises here,
        before the thread starts; `options` are generate()'s."""
        self.prompt_ids(prompt, options.get("system"), options.get("raw", False))
        Sampling(**{k: options[k] for k in ("temperature", "top_k", "top_p", "seed") if k in options}).check()
        return Generation(lambda on_text, cancel: self.generate(prompt, max_new_tokens, on_text=on_text,
                                                                cancel=cancel, **options),
                          on_text, on_done)


def load(folder: str | Path, **kwargs) -> DFlashModel:
    return DFlashModel(folder, **kwargs)
