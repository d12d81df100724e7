"""Token counts with a local model's own tokenizer and chat template, at data-tool speed.

``stats`` counts what the local trainer will see: the whole rendered conversation and the
assistant tokens that carry the loss (each answer and its end-of-turn token, ``chat_data``).
Rendering and tokenising every example through transformers costs about 25 times the OpenAI
count, so this reads the model's ``tokenizer.json`` with the ``tokenizers`` library (no
transformers import: a fraction of the memory) and its chat template with jinja2, and:

- renders the template once per message shape (the roles in order) with empty contents, which
  gives the template's own tokens for that shape;
- encodes the contents of a whole block of examples in one ``encode_batch`` call;
- adds them up. That equals tokenising the rendered text wherever the template inserts each
  content verbatim between tokens that never merge with it: checked once per shape (rendering
  with two different probe contents must add exactly their tokens), and an example with content
  that starts or ends with whitespace (which may merge with the template's newlines) is rendered
  and encoded whole instead (its total exact; its trained tokens counted per answer).

Runs inside the block-parallel pass of ``analysis`` (forked workers share the tokenizer).
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PROBES = ("alpha", "beta gamma")


@dataclass
class LocalCounts:
    tokens: array = field(default_factory=lambda: array("i"))  # per example
    assistant: int = 0  # tokens carrying the loss
    fixed: array = field(default_factory=lambda: array("i"))  # per example: tokens outside user messages


ACTIVE: LocalCounter | None = None  # set by analysis before it forks its workers, which inherit it


class LocalCounter:
    def __init__(self, tokenizer_dir: str | Path, model: str) -> None:
        import jinja2
        from tokenizers import Tokenizer

        d = Path(tokenizer_dir)
        self.model = model
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if not template and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(template, str) or not template:
            raise ValueError(f"{d} has no chat template")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template)
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_tokens = len(self._encode(self.special.get("eos_token") or ""))
        self._shapes: dict[tuple[str, ...], int | None] = {}

    def _lengths(self, texts: list[str]) -> list[int]:
        """Token counts of many texts: batch encoding without offsets where the library has it,
        in slices, so that a block never holds thousands of Encoding objects at once."""
        encode = getattr(self.tokenizer, "encode_batch_fast", None) or self.tokenizer.encode_batch
        out: list[int] = []
        for k in range(0, len(texts), 256):
            out.extend(len(e.ids) for e in encode(texts[k : k + 256], add_special_tokens=False))
        return out

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _render(self, messages: list[dict[str, Any]]) -> str:
        return str(self.template.render(messages=messages, add_generation_prompt=False, **self.special))

    def _overhead(self, roles: tuple[str, ...]) -> int | None:
        """The template's own tokens for this shape, or None if contents are not added verbatim."""
        if roles not in self._shapes:
            empty = len(self._encode(self._render([{"role": r, "content": ""} for r in roles])))
            ok = True
            for probe in _PROBES:
                rendered = self._render([{"role": r, "content": probe} for r in roles])
                ok = ok and len(self._encode(rendered)) == empty + len(roles) * len(self._encode(probe))
            self._shapes[roles] = empty if ok else None
        return self._shapes[roles]

    def count_block(self, examples: list[list[dict[str, Any]]]) -> LocalCounts:
        out = LocalCounts()
        contents: list[str] = []
        plans: list[tuple[int | None, list[int]]] = []  # (overhead or None: slow path, content slots)
        for messages in examples:
            roles = tuple(str(m.get("role")) for m in messages)
            texts = [m.get("content") for m in messages]
            overhead = self._overhead(roles)
            if overhead is None or not all(isinstance(t, str) and t == t.strip() for t in texts if t):
                plans.append((None, []))
                continue
            slots = list(range(len(contents), len(contents) + len(texts)))
            contents.extend(t or "" for t in texts)  # type: ignore[misc]
            plans.append((overhead, slots))
        lengths = self._lengths(contents)
        for messages, (overhead, slots) in zip(examples, plans):
            if overhead is None:
                total, trained, user = self._slow(messages)
            else:
                total = overhead + sum(lengths[s] for s in slots)
                trained = sum(
                    lengths[s] + self.eos_tokens
                    for m, s in zip(messages, slots)
                    if m.get("role") == "assistant" and m.get("weight", 1) != 0
                )
                user = sum(lengths[s] for m, s in zip(messages, slots) if m.get("role") == "user")
            out.tokens.append(total)
            out.assistant += trained
            out.fixed.append(total - user)
        return out

    def _slow(self, messages: list[dict[str, Any]]) -> tuple[int, int, int]:
        clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        total = len(self._encode(self._render(clean)))
        trained = sum(
            len(self._encode(str(m.get("content") or ""))) + self.eos_tokens
            for m in messages
            if m.get("role") == "assistant" and m.get("weight", 1) != 0
        )
        user = sum(len(self._encode(str(m.get("content") or ""))) for m in messages if m.get("role") == "user")
        return total, trained, user


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    raise ValueError(message)
