"""Per-example checks of OpenAI chat JSONL, as OpenAI's server and cookbook notebook make them.

Pure functions of one line, so they can run in worker processes. The cookbook's categories keep
their names (data_type, missing_messages_list, message_missing_key, message_unrecognized_key,
unrecognized_role, missing_content, example_missing_assistant_message). Unlike the cookbook, an
assistant message carrying only ``tool_calls`` or ``function_call`` is not missing its content.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .readers import JsonValueError, loads
from .tokens import count_message_tokens, get_encoding

MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "tool_calls", "tool_call_id", "weight"})
EXAMPLE_KEYS = frozenset({"messages", "tools", "functions", "parallel_tool_calls"})
# OpenAI's preference (DPO) example: {"input": {"messages": [...], "tools": [...]},
# "preferred_output": [one assistant message], "non_preferred_output": [one assistant message]}
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
PREFERENCE_INPUT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})


def first_example_kind(path: Any) -> str | None:
    """What the first example of a JSONL file is: ``preference`` (a DPO pair), ``chat``, or
    None where it cannot be told (no example, not JSON): the file's own validation says why.
    A cheap look for callers that route on it (eval, migrate) before the full check."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = loads(line)
                except (ValueError, RecursionError):
                    return None
                if isinstance(first, dict) and "messages" not in first and PREFERENCE_KEYS & first.keys():
                    return "preference"
                return "chat"
    return None


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
    messages: list[Any] | None = None  # the parsed messages of a usable example
    kind: str = "chat"  # or "preference": a DPO pair (``check_preference``)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def _check_parts(parts: list[Any], lineno: int, i: int, findings: list[Finding]) -> None:
    """Content parts: objects with a type; a text part's text a string. Other parts (images, for
    OpenAI's vision fine-tuning) pass, with a warning that the local engine reads text only."""
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            findings.append(
                Finding(
                    "error",
                    "invalid_content",
                    lineno,
                    where,
                    'a content part must be an object {"type": "text", "text": "..."}',
                )
            )
        elif part["type"] == "text" and not isinstance(part.get("text"), str):
            findings.append(
                Finding("error", "invalid_content", lineno, f"{where}.text", "a text part needs its text as a string")
            )
        elif part["type"] != "text":
            findings.append(
                Finding(
                    "warning",
                    "non_text_part",
                    lineno,
                    where,
                    f"a {part['type'][:40]!r} part: the local engine trains on text only",
                )
            )


def _check_messages(messages: list[Any], lineno: int, findings: list[Finding], where: str) -> tuple[bool, bool, Any]:
    """Check each message of a list (``where`` names it in findings: ``messages``, or a
    preference pair's ``input.messages``); returns (has an assistant message, has one to learn
    from, the last assistant content)."""
    has_assistant = trainable = False
    last_answer: Any = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            findings.append(
                Finding(
                    "error",
                    "data_type",
                    lineno,
                    f"{where}[{i}]",
                    f"message must be an object, got {type(message).__name__}",
                )
            )
            continue
        if not message.keys() <= MESSAGE_KEYS:
            for key in message.keys() - MESSAGE_KEYS:
                findings.append(
                    Finding(
                        "error", "message_unrecognized_key", lineno, f"{where}[{i}].{key}", f"unrecognised key {key!r}"
                    )
                )
        role = message.get("role")
        if role not in ROLES:
            if "role" not in message:
                findings.append(
                    Finding("error", "message_missing_key", lineno, f"{where}[{i}].role", "message has no 'role'")
                )
            else:
                findings.append(
                    Finding(
                        "error",
                        "unrecognized_role",
                        lineno,
                        f"{where}[{i}].role",
                        f"role {role!r} is not one of {', '.join(sorted(ROLES))}",
                    )
                )
        content = message.get("content")
        if type(content) is str and content.strip():
            pass  # the common case
        elif role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            pass  # a tool call needs no content (the cookbook wrongly flags this)
        elif "content" not in message:
            findings.append(
                Finding("error", "message_missing_key", lineno, f"{where}[{i}].content", "message has no 'content'")
            )
        elif content is None or content == "" or content == [] or (isinstance(content, str) and not content.strip()):
            findings.append(Finding("error", "missing_content", lineno, f"{where}[{i}].content", "content is empty"))
        elif not isinstance(content, list):
            findings.append(
                Finding(
                    "error",
                    "invalid_content",
                    lineno,
                    f"{where}[{i}].content",
                    f"content must be text, got {type(content).__name__}",
                )
            )
        elif role == "assistant":
            findings.append(
                Finding(
                    "error",
                    "invalid_content",
                    lineno,
                    f"{where}[{i}].content",
                    "assistant content must be text, not a list of parts",
                )
            )
        else:
            _check_parts(content, lineno, i, findings)
        if "weight" in message:
            weight = message["weight"]
            if isinstance(weight, bool) or weight not in (0, 1):
                findings.append(
                    Finding(
                        "error",
                        "invalid_weight",
                        lineno,
                        f"{where}[{i}].weight",
                        f"weight must be 0 or 1, got {weight!r}",
                    )
                )
            elif role != "assistant":
                findings.append(
                    Finding(
                        "error",
                        "invalid_weight",
                        lineno,
                        f"{where}[{i}].weight",
                        "weight is only allowed on assistant messages",
                    )
                )
        if role == "assistant":
            has_assistant = True
            last_answer = content
            if message.get("weight", 1) != 0:
                trainable = True
    return has_assistant, trainable, last_answer


def check_line(lineno: int, raw: bytes, encoding: str | None, first: bool = False) -> LineResult:
    """Decode and check one JSONL line; count its tokens with ``encoding`` when given.

    The hot loop of validate and stats: field names are only formatted when there is a finding."""
    result = LineResult(lineno)
    findings = result.findings

    try:
        example = loads(raw.decode("utf-8-sig" if first else "utf-8"))
    except JsonValueError as exc:
        findings.append(Finding("error", "invalid_json", lineno, None, str(exc)))
        return result
    except RecursionError:
        from .readers import TOO_DEEP

        findings.append(Finding("error", "invalid_json", lineno, None, TOO_DEEP))
        return result
    except UnicodeDecodeError as exc:
        findings.append(
            Finding(
                "error",
                "invalid_encoding",
                lineno,
                None,
                f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
            )
        )
        return result
    except json.JSONDecodeError as exc:
        from .readers import json_error_message

        findings.append(
            Finding(
                "error", "invalid_json", lineno, None, json_error_message(exc, raw.decode("utf-8", "replace"), first)
            )
        )
        return result
    if not isinstance(example, dict):
        findings.append(
            Finding(
                "error", "data_type", lineno, None, f"each line must be a JSON object, got {type(example).__name__}"
            )
        )
        return result
    if "messages" not in example and PREFERENCE_KEYS & example.keys():
        return check_preference(result, example, raw, encoding)
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        text = "no 'messages' list" if messages is None else "'messages' must be a non-empty list"
        findings.append(Finding("error", "missing_messages_list", lineno, "messages", text))
        return result
    if len(example) > 1:
        for key in example:
            if key not in EXAMPLE_KEYS:
                findings.append(
                    Finding("warning", "example_unrecognized_key", lineno, key, f"unrecognised key {key!r} is ignored")
                )
    result.n_messages = len(messages)
    has_assistant, trainable, last_answer = _check_messages(messages, lineno, findings, "messages")
    if not has_assistant:
        findings.append(
            Finding(
                "error", "example_missing_assistant_message", lineno, "messages", "no assistant message to learn from"
            )
        )
    elif not trainable:
        findings.append(
            Finding(
                "warning",
                "no_trainable_message",
                lineno,
                "messages",
                "every assistant message has weight 0: nothing to learn",
            )
        )
    if isinstance(last_answer, str) and len(last_answer) <= ANSWER_SAMPLE_CHARS:
        result.answer = last_answer.strip()
    # duplicates are identical lines (ignoring surrounding blanks): hashing the bytes costs a
    # tenth of re-serialising the example canonically
    result.fingerprint = int.from_bytes(hashlib.blake2b(raw.strip(), digest_size=8).digest(), "little")
    if encoding is not None:
        result.tokens, result.assistant_tokens = count_message_tokens(messages, get_encoding(encoding))
    result.messages = messages
    return result


def check_preference(result: LineResult, example: dict[str, Any], raw: bytes, encoding: str | None) -> LineResult:
    """OpenAI's rules for one preference pair: an input conversation that ends where the model
    answers (a user or tool message, never an assistant one), and two outputs of exactly one
    assistant message each, with text, that differ. Its tokens are counted as the shared prompt
    plus both outputs: how this project assumes OpenAI bills a pair (it publishes no rule)."""
    result.kind = "preference"
    findings = result.findings
    lineno = result.line
    for key in PREFERENCE_KEYS - example.keys():
        findings.append(Finding("error", "missing_preference_key", lineno, key, f"a preference pair needs {key!r}"))
    for key in example.keys() - PREFERENCE_KEYS:
        findings.append(
            Finding("warning", "example_unrecognized_key", lineno, key, f"unrecognised key {key!r} is ignored")
        )
    inp = example.get("input")
    messages: Any = None
    if "input" in example:
        if not isinstance(inp, dict):
            findings.append(Finding("error", "data_type", lineno, "input", "input must be an object with messages"))
        else:
            for key in inp.keys() - PREFERENCE_INPUT_KEYS:
                findings.append(
                    Finding("error", "message_unrecognized_key", lineno, f"input.{key}", f"unrecognised key {key!r}")
                )
            messages = inp.get("messages")
            if not isinstance(messages, list) or not messages:
                findings.append(
                    Finding(
                        "error",
                        "missing_messages_list",
                        lineno,
                        "input.messages",
                        "input needs a non-empty messages list",
                    )
                )
                messages = None
            else:
                _check_messages(messages, lineno, findings, "input.messages")
                last = messages[-1]
                if isinstance(last, dict) and last.get("role") == "assistant":
                    findings.append(
                        Finding(
                            "error",
                            "input_ends_with_assistant",
                            lineno,
                            f"input.messages[{len(messages) - 1}]",
                            "the input must end where the model answers (a user or tool message), not with an "
                            "assistant message",
                        )
                    )
    outputs: list[Any] = []
    for key in ("preferred_output", "non_preferred_output"):
        if key not in example:
            continue
        out = example[key]
        if not isinstance(out, list) or len(out) != 1:
            findings.append(
                Finding(
                    "error",
                    "invalid_preference_output",
                    lineno,
                    key,
                    f"{key} must be a list of exactly one assistant message, got "
                    + (f"{len(out)} messages" if isinstance(out, list) else type(out).__name__),
                )
            )
            continue
        message = out[0]
        if not isinstance(message, dict) or message.get("role") != "assistant":
            role = message.get("role") if isinstance(message, dict) else type(message).__name__
            findings.append(
                Finding(
                    "error", "invalid_preference_output", lineno, f"{key}[0].role", f"must be assistant, got {role!r}"
                )
            )
            continue
        _check_messages(out, lineno, findings, key)
        if message.get("tool_calls") or message.get("function_call"):  # passes the chat rule, not this one
            findings.append(
                Finding(
                    "error", "invalid_preference_output", lineno, f"{key}[0]", "an output must be text, not a tool call"
                )
            )
        if "weight" in message:
            findings.append(
                Finding(
                    "error",
                    "invalid_weight",
                    lineno,
                    f"{key}[0].weight",
                    "outputs of a preference pair carry no weight",
                )
            )
        outputs.append(message)
    if len(outputs) == 2 and outputs[0].get("content") == outputs[1].get("content"):
        findings.append(
            Finding(
                "error",
                "identical_outputs",
                lineno,
                "non_preferred_output[0].content",
                "the preferred and non-preferred outputs are the same: nothing to prefer",
            )
        )
    if not result.ok or messages is None or len(outputs) != 2:
        return result
    result.n_messages = len(messages) + 2
    result.fingerprint = int.from_bytes(hashlib.blake2b(raw.strip(), digest_size=8).digest(), "little")
    both = [*messages, *(dict(m) for m in outputs)]
    if encoding is not None:
        result.tokens, result.assistant_tokens = count_message_tokens(both, get_encoding(encoding))
    result.messages = both
    return result


@dataclass
class ChunkResult:
    """What the parent needs of a chunk of lines, compact to pickle: arrays, not objects."""

    n_lines: int = 0
    lines: array = field(default_factory=lambda: array("I"))  # usable examples only, below too
    tokens: array = field(default_factory=lambda: array("i"))
    messages: array = field(default_factory=lambda: array("I"))
    fingerprints: array = field(default_factory=lambda: array("Q"))
    assistant_tokens: int = 0
    findings: list[Finding] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0  # usable examples whose answer is not short text
    local: Any = None  # local_tokens.LocalCounts, when a local tokenizer counts too
    first_line: dict[str, int] = field(default_factory=dict)  # kind ("chat", "preference") -> its first line


def check_block(block: tuple[int, bytes], encoding: str | None, path: str, local: bool = False) -> ChunkResult:
    """Check the lines of one block from :func:`readers.iter_blocks`; with ``local``, also count
    the usable examples with the local tokenizer (``local_tokens.ACTIVE``) in one batch."""
    from . import local_tokens
    from .readers import split_block

    out = ChunkResult()
    usable: list[list[Any]] = []
    for n, raw in split_block(path, *block):
        out.n_lines += 1
        r = check_line(n, raw, encoding, n == 1)
        out.findings.extend(r.findings)
        if r.messages is not None or r.kind == "preference":
            out.first_line.setdefault(r.kind, n)
        if not r.ok:
            continue
        out.lines.append(n)
        out.tokens.append(r.tokens)
        out.messages.append(r.n_messages)
        out.fingerprints.append(r.fingerprint)
        out.assistant_tokens += r.assistant_tokens
        if local and r.messages is not None:
            usable.append(r.messages)
        if r.answer is None:
            out.unanswered += 1
        else:
            out.answers[r.answer] += 1
    if local and local_tokens.ACTIVE is not None:
        out.local = local_tokens.ACTIVE.count_block(usable)
    return out
