"""Exact OpenAI token counts, offline.

tiktoken downloads its encodings at first use, which fails without internet. The package
``bpe-openai`` bundles cl100k_base and o200k_base with a tiktoken-compatible Rust encoder (about
twice tiktoken's speed on one core, measured in bench/README.md), so we use it.

Counting follows OpenAI's cookbook: 3 tokens per message, the tokens of each value, 1 more per
``name``, and 3 to prime the reply. Text is encoded as ordinary text: ``<|endoftext|>`` written
inside a message counts as the characters it is, as OpenAI's tokenizer treats user text.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Protocol

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMER = 3


class Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@lru_cache(maxsize=4)
def get_encoding(name: str) -> Encoder:
    import bpe_openai

    encoding = bpe_openai.get_encoding(name)
    # Importing bpe_openai reads every bundled vocabulary (cl100k, o200k, voyage3) into Python
    # dicts to look up their special tokens, and keeps them in lru caches for good: 36 MB that
    # each data job then carries (and each forked worker may copy). The encoder holds what it
    # needs; clearing the caches only means a later lookup reads the file again.
    try:
        from bpe_openai import registry

        registry._load_mergeable_ranks.cache_clear()
        for build in registry.ENCODING_CONSTRUCTORS.values():
            getattr(build, "cache_clear", lambda: None)()
    except (ImportError, AttributeError):  # another bpe_openai layout: nothing to free
        pass
    return encoding  # type: ignore[no-any-return]


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: count the text parts
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_SHORT: dict[tuple[int, str], int] = {}  # token counts of roles and names, which repeat


def _short_count(enc: Encoder, text: str) -> int:
    key = (id(enc), text)
    n = _SHORT.get(key)
    if n is None:
        if len(_SHORT) > 4096:
            _SHORT.clear()
        n = _SHORT[key] = len(enc.encode_ordinary(text))
    return n


def count_message_tokens(messages: list[Any], enc: Encoder) -> tuple[int, int]:
    """(tokens of the whole example, tokens of its assistant messages' content)."""
    encode = enc.encode_ordinary
    total = TOKENS_REPLY_PRIMER
    assistant = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        is_assistant = message.get("role") == "assistant"
        for key, value in message.items():
            if key == "weight":
                continue
            if key == "role" or key == "name":
                n = _short_count(enc, value) if isinstance(value, str) else len(encode(_value_text(value)))
                if key == "name":
                    n += TOKENS_PER_NAME
                total += n
                continue
            n = len(encode(value if isinstance(value, str) else _value_text(value)))
            total += n
            if is_assistant and key in ("content", "tool_calls", "function_call"):
                assistant += n
    return total, assistant
