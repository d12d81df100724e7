"""Token counts with a local model's own tokenizer and chat template (for ``stats``)."""

from __future__ import annotations

import json
from typing import Any

from ..home import Home
from .base_models import DEFAULT_BASE_MODEL, resolve_base, tokenizer_dir
from .chat_data import IGNORE, tokenize_example


def count_file_tokens(path: str, model: str | None = None) -> dict[str, Any]:
    """Tokens per example as the local trainer sees them, and how many carry the loss."""
    from transformers import AutoTokenizer

    base = resolve_base(model or DEFAULT_BASE_MODEL)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(base, Home()))
    total = trained = n = biggest = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                row = tokenize_example(tok, messages)
            except Exception:
                continue  # validate reports bad lines; here they are just not counted
            if row is None:
                continue
            n += 1
            total += len(row["input_ids"])
            biggest = max(biggest, len(row["input_ids"]))
            trained += sum(x != IGNORE for x in row["labels"])
    return {
        "model": base.id,
        "total_tokens": total,
        "assistant_tokens": trained,
        "mean": round(total / n, 1) if n else 0,
        "max": biggest,
    }
