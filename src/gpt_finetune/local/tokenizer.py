"""The local model's tokenizer for ``stats``: which files count, and what the counts mean.

The counting itself runs in the data layer's block-parallel pass (``data.local_tokens``); this
module only finds the model's tokenizer files (extracting them from the default model's GGUF
once) and summarises the counts against the trainer's ``max_length``.
"""

from __future__ import annotations

from typing import Any

from ..contract import DEFAULT_MAX_LENGTH
from ..data.local_tokens import LocalCounter, LocalCounts
from ..data.stats import distribution
from ..home import Home
from .base_weights import DEFAULT_BASE_MODEL, resolve_base, tokenizer_dir


def local_counter(model: str | None = None, home: str | None = None) -> LocalCounter:
    base = resolve_base(model or DEFAULT_BASE_MODEL)
    return LocalCounter(tokenizer_dir(base, Home(home)), base.id)


def summarize(counter: LocalCounter, counts: LocalCounts, max_length: int | None = None) -> dict[str, Any]:
    """Totals as the trainer sees them, and how many examples it would shorten or drop."""
    limit = max_length or DEFAULT_MAX_LENGTH
    too_long = sum(1 for f in counts.fixed if f > limit)  # even with every user message cut
    over = sum(1 for t in counts.tokens if t > limit)
    return {
        "model": counter.model,
        "total_tokens": int(sum(counts.tokens)),
        "assistant_tokens": counts.assistant,
        "tokens_per_example": distribution(counts.tokens),
        "max_length": limit,
        "n_truncated": over - too_long,
        "n_too_long": too_long,
    }
