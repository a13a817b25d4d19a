"""The target's tokenizer through the `tokenizers` library (no transformers at runtime)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import UserError


class Tokenizer:
    def __init__(self, path: Path):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"cannot read the tokenizer {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        # Special tokens are already spelled out by the chat template; add none of our own.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Each push decodes only the tokens since the previous piece plus the ones before it (a reply of n
    tokens costs O(n) decoding, not O(n^2)); starting a token early keeps the leading space that some
    tokenizers drop at the start of a decode."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # where the decoded window starts
        self.read = 0    # the window's tokens before this one are already emitted

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # nothing new, or a multi-byte character split across tokens: wait for the rest
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
