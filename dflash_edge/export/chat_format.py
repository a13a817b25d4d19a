"""Turn a Jinja chat template into plain prefix/suffix strings the torch-free runtime can apply.

The runtime has no Jinja. Almost every chat template is "preamble, then per message a role prefix, the
content, a role suffix, then a generation prompt". We render the template on probe conversations, read
those pieces off, and keep them only if they reproduce the template exactly on other conversations.
"""
from __future__ import annotations

from ..runtime.chat import render_chat

U, V, A, S = "\x01USER-ONE\x01", "\x01USER-TWO\x01", "\x01ASSISTANT\x01", "\x01SYSTEM\x01"


def _render(tokenizer, messages, generation_prompt: bool, template_kwargs: dict) -> str:
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs,
    )


def _between(text: str, left: str, right: str) -> str:
    start = text.index(left) + len(left)
    return text[start:text.index(right, start)]


def _strip_suffix(text: str, suffix: str) -> str:
    if suffix and not text.endswith(suffix):
        raise ValueError("template pieces do not line up")
    return text[: len(text) - len(suffix)] if suffix else text


def derive(tokenizer, template_kwargs: dict | None = None) -> dict:
    """Return the chat pieces, or raise ValueError if this template does not fit the model."""
    kw = template_kwargs or {}
    user_only = _render(tokenizer, [("user", U)], False, kw)
    with_gen = _render(tokenizer, [("user", U)], True, kw)
    two_turns = _render(tokenizer, [("user", U), ("assistant", A), ("user", V)], False, kw)
    one_turn = _render(tokenizer, [("user", U), ("assistant", A)], False, kw)
    if not with_gen.startswith(user_only):
        raise ValueError("generation prompt is not appended at the end")
    generation_prompt = with_gen[len(user_only):]
    user_suffix = user_only[user_only.index(U) + len(U):]
    assistant_prefix = _between(one_turn, U + user_suffix, A)
    assistant_suffix = one_turn[one_turn.index(A) + len(A):]
    suffix_then_prefix = _between(two_turns, A, V)  # assistant suffix + user prefix
    if not suffix_then_prefix.startswith(assistant_suffix):
        raise ValueError("assistant turns do not compose")
    user_prefix = suffix_then_prefix[len(assistant_suffix):]
    head = user_only[:user_only.index(U)]
    preamble = _strip_suffix(head, user_prefix)
    pieces = {
        "preamble": preamble,  # what precedes the first message when there is no system message
        "user": [user_prefix, user_suffix],
        "assistant": [assistant_prefix, assistant_suffix],
        "generation_prompt": generation_prompt,
        "template_kwargs": kw,
    }
    try:
        with_system = _render(tokenizer, [("system", S), ("user", U)], False, kw)
        sys_head = with_system[:with_system.index(U)]
        sys_prefix = sys_head[:sys_head.index(S)]
        sys_suffix = _strip_suffix(sys_head[sys_head.index(S) + len(S):], user_prefix)
        pieces["system"] = [sys_prefix, sys_suffix]
    except Exception:  # templates that reject a system message
        pieces["system"] = None
    _check(tokenizer, pieces, kw)
    return pieces


def _check(tokenizer, pieces, kw) -> None:
    probes = [
        [("user", "Write a haiku about the sea.")],
        [("user", "hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.\nA short one.")],
    ]
    if pieces["system"] is not None:
        probes.append([("system", "Be terse."), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?")])
    for messages in probes:
        expected = _render(tokenizer, messages, True, kw)
        if render_chat(pieces, messages) != expected:
            raise ValueError(f"derived pieces do not reproduce the template for {messages!r}")
