"""Chat examples to token ids and loss labels, with the model's own chat template.

Loss is on assistant tokens only: each assistant message's content and the end-of-turn token
that follows it (so the model learns to stop), never the prompt, the template's role headers,
or messages with ``weight: 0``. TRL can build such masks only from templates that carry
``{% generation %}`` markers, which SmolLM2's (like most) lacks; so we render the template
incrementally and map assistant character spans to tokens through the tokenizer's offsets,
which works with any prefix-consistent template. The result (``input_ids``, ``labels``) is
given to TRL's SFTTrainer as a pre-tokenised dataset.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError

IGNORE = -100


def render_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation as text, and the character spans the loss covers."""
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    text = tokenizer.apply_chat_template(clean, tokenize=False)
    eos = tokenizer.eos_token or ""
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        prefix = tokenizer.apply_chat_template(clean[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(clean[: i + 1], tokenize=False)
        if not upto.startswith(prefix) or not text.startswith(upto):
            raise DataError(
                "the model's chat template is not prefix-consistent; cannot mask the loss",
                hint="use a model whose chat template renders each turn after the previous ones",
            )
        start = len(prefix)
        content = message.get("content") or ""
        at = upto.find(content, start) if content else start
        if at < 0:
            raise DataError("the chat template changed an assistant message's text; cannot mask the loss")
        end = at + len(content)
        if eos:
            eos_at = upto.find(eos, end)
            if eos_at >= 0:
                end = eos_at + len(eos)  # learn to stop
        spans.append((start, end))
    return text, spans


def tokenize_example(
    tokenizer: Any, messages: list[dict[str, Any]], max_length: int | None = None
) -> dict[str, list[int]]:
    text, spans = render_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[k] = ids[k]
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def tokenize_file(tokenizer: Any, path: str, max_length: int | None = None) -> list[dict[str, list[int]]]:
    import json

    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            example = json.loads(line)
            row = tokenize_example(tokenizer, example["messages"], max_length)
            if all(label == IGNORE for label in row["labels"]):
                continue  # nothing to learn (all weight 0, or truncated away)
            rows.append(row)
    if not rows:
        raise DataError("no example has a trainable assistant message", path=path)
    return rows
