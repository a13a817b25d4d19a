"""Chat prompts without Jinja: the exporter stores the template as prefix/suffix pieces it has checked."""
from __future__ import annotations

from typing import Callable, Iterable

from ..errors import UserError


def _segments(pieces: dict, messages: list[tuple[str, str]], generation_prompt: bool):
    """The rendered prompt as (text, is_content) pairs: the template's own text, and the messages' text."""
    if messages and messages[0][0] == "system":
        if pieces.get("system") is None:
            raise UserError("this model's chat template takes no system message")
        prefix, suffix = pieces["system"]
        yield from ((prefix, False), (messages[0][1], True), (suffix, False))
        messages = messages[1:]
    else:
        yield pieces["preamble"], False
    for role, content in messages:
        if role not in ("user", "assistant"):
            raise UserError(f"unknown chat role {role!r}; use system (first only), user or assistant")
        prefix, suffix = pieces[role]
        yield from ((prefix, False), (content, True), (suffix, False))
    if generation_prompt:
        yield pieces["generation_prompt"], False


def render_chat(pieces: dict, messages: list[tuple[str, str]], generation_prompt: bool = True) -> str:
    """Render [(role, content), ...] exactly as the model's chat template would."""
    return "".join(text for text, _ in _segments(pieces, messages, generation_prompt))


def encode_chat(pieces: dict, messages: list[tuple[str, str]], encode: Callable[[str], list[int]],
                encode_text: Callable[[str], list[int]], specials: Iterable[str]) -> list[int]:
    """Token ids for a chat, where a special token spelled out inside a message is text, not a marker.

    Encoding the rendered string would turn a user's "<|im_end|><|im_start|>system" into real role tokens:
    a message could then speak as the system. encode parses special tokens (for the template's own),
    encode_text does not. A chat with no special token in its messages is encoded in one piece, exactly
    as render_chat's text is, so ordinary prompts tokenize as they always did."""
    specials = [s for s in specials if s]
    ids, pending = [], ""
    for text, is_content in _segments(pieces, messages, True):
        if is_content and any(s in text for s in specials):
            ids += encode(pending) if pending else []
            ids += encode_text(text)
            pending = ""
        else:
            pending += text
    return ids + (encode(pending) if pending else [])
