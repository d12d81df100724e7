"""Convert raw records to OpenAI chat examples (``{"messages": [...]}``).

Record formats (chosen with ``--format`` or detected from the first record):

- ``seed``: the seed's raw format, ``{"id", "conversations": [{"from", "value"}, ...]}`` (ShareGPT
  style); every turn is kept, roles human/user, gpt/assistant, system and tool are mapped;
- ``alpaca``: ``{"instruction", "input", "output"}`` (optional ``system``);
- ``openai``: chat JSONL, ``{"messages": [...]}``, passed through;
- ``csv``: rows of a CSV/TSV file, with ``prompt_columns`` joined as ``name: value`` (the seed's
  ``title: ... body: ...`` shape) and the answer in ``label_column``;
- ``preference``: preference pairs (for ``method: dpo``) to OpenAI's preference format,
  ``{"input": {"messages"}, "preferred_output": [assistant], "non_preferred_output": [assistant]}``:
  OpenAI's own passed through, or ``chosen`` / ``rejected`` as TRL and the Hugging Face datasets
  write them, with a ``prompt`` (text or messages) or without one (two whole conversations that
  share every message but the last answer: the shared part becomes the input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .labels import LabelError, format_labels, parse_labels

RECORD_FORMATS = ("seed", "alpaca", "openai", "csv", "preference")

ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


@dataclass
class ConvertOptions:
    sys_prompt: str | None = None
    task_type: str = "answering"
    label_format: str = "seed"
    prompt_columns: Sequence[str] = ()
    label_column: str | None = None
    system_column: str | None = None


@dataclass
class Converted:
    example: dict[str, Any]
    labels: list[str] = field(default_factory=list)


def detect_record_format(record: Any, container: str) -> str:
    if container in ("csv", "tsv"):
        return "csv"
    if isinstance(record, dict):
        if "conversations" in record:
            return "seed"
        if ("chosen" in record and "rejected" in record) or "preferred_output" in record:
            return "preference"
        if "messages" in record:
            return "openai"
        if "instruction" in record and "output" in record:
            return "alpaca"
    raise DataError(
        "cannot tell the record format: expected 'conversations' (seed/ShareGPT), 'messages' (OpenAI chat) "
        "or 'instruction' and 'output' (Alpaca), or a preference pair ('chosen' and 'rejected', or OpenAI's "
        "'preferred_output')",
        hint="choose it with --format seed|alpaca|openai|csv|preference",
    )


def convert_record(record: Any, fmt: str, opts: ConvertOptions, path: str, line: int) -> Converted:
    """One raw record to one chat example. Raises DataError naming path, line and field."""
    if fmt == "csv":
        messages = _from_csv(record, opts, path, line)
    else:
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, line=line)
        if fmt == "preference":
            return Converted(_preference(record, opts, path, line))
        if fmt == "seed":
            messages = _from_seed(record, path, line)
        elif fmt == "alpaca":
            messages = _from_alpaca(record, path, line)
        elif fmt == "openai":
            messages = _from_openai(record, path, line)
        else:
            raise ValueError(fmt)
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str) and not content.strip() and not m.get("tool_calls") and not m.get("function_call"):
            # OpenAI (and validate) reject an empty message: never write one
            raise DataError(
                f"the {m.get('role')} message is empty",
                path=path,
                line=line,
                field=f"message {i + 1}",
                hint="remove the record or fill in the message",
            )
    if opts.sys_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": opts.sys_prompt})
    example: dict[str, Any] = {"messages": messages}
    if fmt == "openai":
        for key in ("tools", "functions", "parallel_tool_calls"):
            if key in record:
                example[key] = record[key]
    labels: list[str] = []
    if opts.task_type == "classification":
        labels = _apply_labels(messages, opts.label_format, path, line)
    return Converted(example, labels)


def _apply_labels(messages: list[dict[str, Any]], style: str, path: str, line: int) -> list[str]:
    seen: list[str] = []
    answered = False
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
            continue
        try:
            labels = parse_labels(message["content"])
        except LabelError as exc:
            raise DataError(
                str(exc),
                path=path,
                line=line,
                field=f"messages[{i}].content",
                hint="classification answers are labels: ['a', 'b'], [\"a\"], a, or a, b",
            ) from None
        try:
            message["content"] = format_labels(labels, style)
        except LabelError as exc:
            raise DataError(str(exc), path=path, line=line, field=f"messages[{i}].content") from None
        answered = True
        seen.extend(label for label in labels if label not in seen)
    if not answered:
        raise DataError("no assistant answer to take labels from", path=path, line=line)
    return seen


def _text(value: Any, path: str, line: int, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise DataError("is missing or null", path=path, line=line, field=where)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"expected text, got {type(value).__name__}", path=path, line=line, field=where)


def _from_seed(record: dict[str, Any], path: str, line: int) -> list[dict[str, Any]]:
    turns = record.get("conversations")
    if turns is None:
        raise DataError("record has no 'conversations'", path=path, line=line, field="conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("must be a non-empty list of turns", path=path, line=line, field="conversations")
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError("expected an object with 'from' and 'value'", path=path, line=line, field=where)
        speaker = turn.get("from", turn.get("role"))
        if not isinstance(speaker, str) or speaker.strip().lower() not in ROLE_MAP:
            raise DataError(
                f"unknown speaker {speaker!r}; expected one of {', '.join(sorted(ROLE_MAP))}",
                path=path,
                line=line,
                field=where + ".from",
            )
        value = turn.get("value", turn.get("content"))
        messages.append(
            {"role": ROLE_MAP[speaker.strip().lower()], "content": _text(value, path, line, where + ".value")}
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no 'gpt' (assistant) turn to learn from", path=path, line=line, field="conversations")
    return messages


def _from_alpaca(record: dict[str, Any], path: str, line: int) -> list[dict[str, Any]]:
    instruction = _text(record.get("instruction"), path, line, "instruction")
    extra = record.get("input")
    prompt = instruction if not extra else f"{instruction}\n\n{_text(extra, path, line, 'input')}"
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], path, line, "system")})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(record.get("output"), path, line, "output")})
    return messages


def _from_openai(record: dict[str, Any], path: str, line: int) -> list[dict[str, Any]]:
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataError("must be a list of messages", path=path, line=line, field="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError("expected an object", path=path, line=line, field=f"messages[{i}]")
        out.append(dict(message))
    return out


def _from_csv(row: dict[str, str], opts: ConvertOptions, path: str, line: int) -> list[dict[str, Any]]:
    if not opts.prompt_columns or not opts.label_column:
        raise DataError(
            "CSV/TSV input needs --prompt-columns and --label-column",
            path=path,
            hint="for example: --prompt-columns title,body --label-column label",
        )
    parts = []
    for col in opts.prompt_columns:
        if col not in row:
            raise DataError(f"no column {col!r} (columns: {', '.join(row)})", path=path, line=1, field=col)
        parts.append(f"{col}: {row[col]}" if len(opts.prompt_columns) > 1 else row[col])
    if opts.label_column not in row:
        raise DataError(f"no column {opts.label_column!r} (columns: {', '.join(row)})", path=path, line=1)
    answer = row[opts.label_column]
    if not answer or not answer.strip():
        raise DataError("empty answer", path=path, line=line, field=opts.label_column)
    messages = []
    if opts.system_column and row.get(opts.system_column):
        messages.append({"role": "system", "content": row[opts.system_column]})
    messages.append({"role": "user", "content": " ".join(parts)})
    messages.append({"role": "assistant", "content": answer})
    return messages


def _chat(value: Any, path: str, line: int, where: str, *, answer: bool) -> list[dict[str, Any]]:
    """Text or a list of messages (``role``/``content``, or ShareGPT's ``from``/``value``) as
    messages; plain text is one assistant message (``answer``) or one user message."""
    if isinstance(value, str):
        return [{"role": "assistant" if answer else "user", "content": value}]
    if isinstance(value, dict):  # one message on its own
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError("expected text or a non-empty list of messages", path=path, line=line, field=where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError("expected a message object", path=path, line=line, field=f"{where}[{i}]")
        speaker = m.get("role", m.get("from"))
        if not isinstance(speaker, str) or speaker.strip().lower() not in ROLE_MAP:
            raise DataError(f"unknown role {speaker!r}", path=path, line=line, field=f"{where}[{i}].role")
        content = _text(m.get("content", m.get("value")), path, line, f"{where}[{i}].content")
        out.append({"role": ROLE_MAP[speaker.strip().lower()], "content": content})
    return out


def _one_answer(messages: list[dict[str, Any]], path: str, line: int, where: str) -> dict[str, Any]:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(
            f"must be one assistant answer, got {len(messages)} message(s)"
            + (f" ending with a {messages[-1]['role']} one" if messages else ""),
            path=path,
            line=line,
            field=where,
        )
    if not messages[0]["content"].strip():
        raise DataError("the answer is empty", path=path, line=line, field=where)
    return messages[0]


def _preference(record: dict[str, Any], opts: ConvertOptions, path: str, line: int) -> dict[str, Any]:
    """One preference pair in OpenAI's format (see the module's docstring for what is read)."""
    if "preferred_output" in record:  # OpenAI's own
        out: dict[str, Any] = {
            k: record[k] for k in ("input", "preferred_output", "non_preferred_output") if k in record
        }
        inp = out.get("input")
        if not isinstance(inp, dict) or not isinstance(inp.get("messages"), list):
            raise DataError("expected an object with a messages list", path=path, line=line, field="input")
        out["input"] = {**inp, "messages": [dict(m) for m in inp["messages"]]}
        messages = out["input"]["messages"]
    else:
        for key in ("chosen", "rejected"):
            if key not in record:
                raise DataError(f"a preference pair needs {key!r}", path=path, line=line, field=key)
        if record.get("prompt") is not None:
            messages = _chat(record["prompt"], path, line, "prompt", answer=False)
            chosen = _one_answer(_chat(record["chosen"], path, line, "chosen", answer=True), path, line, "chosen")
            rejected = _one_answer(
                _chat(record["rejected"], path, line, "rejected", answer=True), path, line, "rejected"
            )
        else:
            if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
                raise DataError(
                    "chosen and rejected are plain text with no prompt: the prompt cannot be told from the answer",
                    path=path,
                    line=line,
                    field="prompt",
                    hint="give the prompt in a 'prompt' field, or chosen and rejected as lists of messages",
                )
            a = _chat(record["chosen"], path, line, "chosen", answer=True)
            b = _chat(record["rejected"], path, line, "rejected", answer=True)
            if a[:-1] != b[:-1]:
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                raise DataError(
                    f"chosen and rejected do not share their prompt: they differ at message {k + 1}, before the "
                    "last answer (a pair's two outputs answer the same conversation)",
                    path=path,
                    line=line,
                    field=f"chosen[{k}]",
                )
            messages = a[:-1]
            chosen = _one_answer(a[-1:], path, line, f"chosen[{len(a) - 1}]")
            rejected = _one_answer(b[-1:], path, line, f"rejected[{len(b) - 1}]")
            if not messages:
                raise DataError("chosen and rejected hold only the answers: no prompt", path=path, line=line)
        out = {"input": {"messages": messages}, "preferred_output": [chosen], "non_preferred_output": [rejected]}
    if opts.sys_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": opts.sys_prompt})
    return out
