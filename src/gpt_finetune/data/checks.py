"""Per-example checks of OpenAI chat JSONL, as OpenAI's server and cookbook notebook make them.

Pure functions of one line, so they can run in worker processes. The cookbook's categories keep
their names (data_type, missing_messages_list, message_missing_key, message_unrecognized_key,
unrecognized_role, missing_content, example_missing_assistant_message). Unlike the cookbook, an
assistant message carrying only ``tool_calls`` or ``function_call`` is not missing its content.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .tokens import count_message_tokens, get_encoding

MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "tool_calls", "tool_call_id", "weight"})
EXAMPLE_KEYS = frozenset({"messages", "tools", "functions", "parallel_tool_calls"})
ROLES = frozenset({"system", "user", "assistant", "tool", "function"})
ANSWER_SAMPLE_CHARS = 200  # answers longer than this are not labels


@dataclass
class Finding:
    severity: str  # "error" or "warning"
    code: str
    line: int | None
    field: str | None
    message: str
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class LineResult:
    line: int
    findings: list[Finding] = field(default_factory=list)
    tokens: int = -1  # -1: not counted (not a usable example)
    assistant_tokens: int = 0
    n_messages: int = 0
    answer: str | None = None  # last assistant content, when short: candidate labels
    fingerprint: int = 0

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def check_line(lineno: int, raw: bytes, encoding: str | None, first: bool = False) -> LineResult:
    """Decode and check one JSONL line; count its tokens with ``encoding`` when given."""
    result = LineResult(lineno)

    def err(code: str, message: str, where: str | None = None, severity: str = "error") -> None:
        result.findings.append(Finding(severity, code, lineno, where, message))

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        err("invalid_encoding", f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
        return result
    try:
        example = json.loads(text)
    except json.JSONDecodeError as exc:
        from .readers import json_error_message

        err("invalid_json", json_error_message(exc, text, first))
        return result
    if not isinstance(example, dict):
        err("data_type", f"each line must be a JSON object, got {type(example).__name__}")
        return result
    messages = example.get("messages")
    if messages is None:
        err("missing_messages_list", "no 'messages' list", "messages")
        return result
    if not isinstance(messages, list) or not messages:
        err("missing_messages_list", "'messages' must be a non-empty list", "messages")
        return result
    for key in example:
        if key not in EXAMPLE_KEYS:
            err("example_unrecognized_key", f"unrecognised key {key!r} is ignored", key, "warning")
    result.n_messages = len(messages)
    has_assistant = False
    trainable = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            err("data_type", f"message must be an object, got {type(message).__name__}", where)
            continue
        role = message.get("role")
        if "role" not in message:
            err("message_missing_key", "message has no 'role'", where + ".role")
        elif role not in ROLES:
            err("unrecognized_role", f"role {role!r} is not one of {', '.join(sorted(ROLES))}", where + ".role")
        for key in message:
            if key not in MESSAGE_KEYS:
                err("message_unrecognized_key", f"unrecognised key {key!r}", f"{where}.{key}")
        content = message.get("content")
        calls = message.get("tool_calls") or message.get("function_call")
        if role == "assistant" and calls:
            pass  # a tool call needs no content (the cookbook wrongly flags this)
        elif "content" not in message:
            err("message_missing_key", "message has no 'content'", where + ".content")
        elif content is None or (isinstance(content, str) and not content.strip()) or content == []:
            err("missing_content", "content is empty", where + ".content")
        elif not isinstance(content, (str, list)):
            err("invalid_content", f"content must be text, got {type(content).__name__}", where + ".content")
        elif isinstance(content, list) and role == "assistant":
            err("invalid_content", "assistant content must be text, not a list of parts", where + ".content")
        if "weight" in message:
            weight = message["weight"]
            if isinstance(weight, bool) or weight not in (0, 1):
                err("invalid_weight", f"weight must be 0 or 1, got {weight!r}", where + ".weight")
            elif role != "assistant":
                err("invalid_weight", "weight is only allowed on assistant messages", where + ".weight")
        if role == "assistant":
            has_assistant = True
            if message.get("weight", 1) != 0:
                trainable = True
    if not has_assistant:
        err("example_missing_assistant_message", "no assistant message to learn from", "messages")
    elif not trainable:
        err("no_trainable_message", "every assistant message has weight 0: nothing to learn", "messages", "warning")
    last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "assistant"), None)
    if last is not None and isinstance(last.get("content"), str) and len(last["content"]) <= ANSWER_SAMPLE_CHARS:
        result.answer = last["content"].strip()
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    result.fingerprint = int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "little")
    if encoding is not None:
        result.tokens, result.assistant_tokens = count_message_tokens(messages, get_encoding(encoding))
    return result


def check_chunk(chunk: list[tuple[int, bytes]], encoding: str | None, first_line: int) -> list[LineResult]:
    return [check_line(n, raw, encoding, n == first_line) for n, raw in chunk]
