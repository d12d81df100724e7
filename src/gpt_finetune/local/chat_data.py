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

from dataclasses import dataclass
from typing import Any

from ..data.messages import text_messages
from ..errors import DataError

IGNORE = -100
TRAINING_SHAPE = "gpt_finetune_training.json"  # saved beside a fine-tuned model: its max_length


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


TRUNCATION_MARK = "\n[...]\n"  # stands where the middle of a long message was cut


def _render_length(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> int:
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


MAX_FIT_PASSES = 4  # re-tokenising at a cut can differ by a token or two: a pass or two more


def fit_messages(
    tokenizer: Any, messages: list[dict[str, Any]], max_length: int, *, add_generation_prompt: bool = False
) -> tuple[list[dict[str, Any]], bool] | None:
    """Shorten the prompt side of a conversation so that it renders to at most ``max_length`` tokens.

    Cuts the middle out of the longest user message (keeping its start and its end, where an
    issue's title and its last words are), then the next longest, and so on; never touches an
    assistant message. Returns ``(messages, truncated)``, or None when even the shortest prompt
    leaves the conversation too long (the answers themselves do not fit). Pure: the same input
    gives the same output, so training and inference (``add_generation_prompt=True``, the prompt
    alone) cut a long prompt the same way.

    Linear in the conversation's size: each pass tokenises the user messages once and plans every
    cut from the token counts, then renders the conversation once to check (a few passes at most,
    as cuts re-tokenise a token or two differently). Rendering after every single cut, as an
    earlier version did, took time growing with the square of the message count: a client's chat
    of 3,000 short messages held the engine for minutes.
    """
    n = _render_length(tokenizer, messages, add_generation_prompt)
    if n <= max_length:
        return messages, False
    out = [dict(m) for m in messages]
    users = [i for i, m in enumerate(out) if m.get("role") == "user" and isinstance(m.get("content"), str)]
    mark = len(tokenizer(TRUNCATION_MARK, add_special_tokens=False)["input_ids"])
    order: list[int] | None = None
    shortest: set[int] = set()  # messages cut as short as they get
    for _ in range(MAX_FIT_PASSES):
        pieces = {
            i: tokenizer(out[i]["content"], add_special_tokens=False)["input_ids"] for i in users if i not in shortest
        }
        if order is None:  # longest first, as the messages came
            order = sorted(pieces, key=lambda k: (-len(pieces[k]), k))
        over = n - max_length
        for i in order:
            if over <= 0:
                break
            if i in shortest:
                continue
            ids = pieces[i]
            keep = len(ids) - over - mark
            if keep < 2 * mark:
                text = tokenizer.decode(ids[:mark], skip_special_tokens=False) + TRUNCATION_MARK
                shortest.add(i)
                over -= len(ids) - 2 * mark
            else:
                head = keep // 2
                tail = keep - head
                text = (
                    tokenizer.decode(ids[:head], skip_special_tokens=False)
                    + TRUNCATION_MARK
                    + tokenizer.decode(ids[len(ids) - tail :], skip_special_tokens=False)
                )
                over = 0
            out[i]["content"] = text
        n = _render_length(tokenizer, out, add_generation_prompt)
        if n <= max_length:
            return out, True
        if all(i in shortest for i in users):
            return None  # every user message is as short as it gets: the rest does not fit
    return None


def tokenize_example(
    tokenizer: Any, messages: list[dict[str, Any]], max_length: int | None = None
) -> dict[str, Any] | None:
    """Token ids and labels; with ``max_length``, a long prompt is shortened first
    (``fit_messages``): ``truncated`` says so, and None means the answers alone do not fit."""
    truncated = False
    if max_length is not None:
        fitted = fit_messages(tokenizer, messages, max_length)
        if fitted is None:
            return None
        messages, truncated = fitted
    text, spans = render_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[k] = ids[k]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


@dataclass
class TokenizedFile:
    rows: list[dict[str, Any]]
    n_truncated: int = 0  # prompts shortened to fit max_length
    n_too_long: int = 0  # dropped: the answers alone are longer than max_length
    n_no_labels: int = 0  # dropped: nothing to learn (every assistant message has weight 0)


def tokenize_file(tokenizer: Any, path: str, max_length: int | None = None) -> TokenizedFile:
    import json

    out = TokenizedFile([])
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            example = json.loads(line)
            row = tokenize_example(tokenizer, text_messages(example["messages"]), max_length)
            if row is None:
                out.n_too_long += 1
                continue
            if all(label == IGNORE for label in row["labels"]):
                out.n_no_labels += 1
                continue
            out.n_truncated += bool(row.pop("truncated"))
            out.rows.append(row)
    if not out.rows:
        raise DataError(
            "no example has a trainable assistant message"
            + (f" within max_length {max_length}" if out.n_too_long else ""),
            path=path,
        )
    return out
