"""A chat message's text, whatever shape its content has.

OpenAI's content is a string or a list of parts (``{"type": "text", "text": ...}``, images for
vision fine-tuning). The chat templates of local models take strings, so everything local that
renders, counts or trains messages reads them through here: text parts joined, other parts left
out (the local engine trains and counts text). ``validate`` refuses parts that are not objects
and text parts without a string, so nothing it accepts reaches a template as a list.
"""

from __future__ import annotations

from typing import Any


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def text_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The messages with each content as text (a message without content keeps none)."""
    out = []
    for m in messages:
        if isinstance(m, dict) and "content" in m and not isinstance(m["content"], str):
            m = {**m, "content": content_text(m["content"])}
        out.append(m)
    return out
