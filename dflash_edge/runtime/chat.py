"""Chat prompts without Jinja: the exporter stores the template as prefix/suffix pieces it has checked."""
from __future__ import annotations

from ..errors import UserError

def render_chat(pieces: dict, messages: list[tuple[str, str]], generation_prompt: bool = True) -> str:
    """Render [(role, content), ...] exactly as the model's chat template would."""
    out = []
    if messages and messages[0][0] == "system":
        if pieces.get("system") is None:
            raise UserError("this model's chat template takes no system message")
        prefix, suffix = pieces["system"]
        out.append(prefix + messages[0][1] + suffix)
        messages = messages[1:]
    else:
        out.append(pieces["preamble"])
    for role, content in messages:
        if role not in ("user", "assistant"):
            raise UserError(f"unknown chat role {role!r}; use system (first only), user or assistant")
        prefix, suffix = pieces[role]
        out.append(prefix + content + suffix)
    if generation_prompt:
        out.append(pieces["generation_prompt"])
    return "".join(out)
