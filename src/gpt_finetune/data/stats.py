"""``stats``: token counts, distributions and the cost of an OpenAI job, from a FileReport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..openai_facts import default_epochs
from .analysis import FileReport


def _percentile(sorted_values: Any, q: float) -> int:
    if len(sorted_values) == 0:
        return 0
    idx = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return int(sorted_values[idx])


def distribution(values: Any) -> dict[str, float]:
    import numpy as np

    arr = np.sort(np.asarray(values))
    if len(arr) == 0:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    return {
        "min": int(arr[0]),
        "mean": round(float(arr.mean()), 1),
        "p50": _percentile(arr, 50),
        "p95": _percentile(arr, 95),
        "max": int(arr[-1]),
    }


@dataclass
class Cost:
    n_epochs: int
    epochs_rule: str
    billed_tokens: int
    usd: float | None


def job_cost(report: FileReport, n_epochs: int | str | None = None) -> Cost:
    """Billed tokens = epochs x sum of per-example tokens, each capped at the model's limit."""
    limit = report.model.example_token_limit
    import numpy as np

    per_epoch = int(np.minimum(np.asarray(report.tokens, dtype=np.int64), limit).sum())
    if isinstance(n_epochs, int):
        epochs, rule = n_epochs, "as given"
    else:
        epochs, rule = default_epochs(report.n_examples), "OpenAI's default for this many examples"
    billed = per_epoch * epochs
    price = report.model.price_per_million
    return Cost(epochs, rule, billed, None if price is None else round(billed / 1e6 * price, 4))


def stats_dict(report: FileReport, n_epochs: int | str | None = None) -> dict[str, Any]:
    cost = job_cost(report, n_epochs)
    return {
        "file": report.path,
        "model": report.model.name,
        "encoding": report.model.encoding,
        "n_examples": report.n_examples,
        # preference pairs (method dpo): a pair's tokens are its prompt once and both outputs,
        # this project's assumption of how OpenAI bills one (it publishes no rule)
        "kind": report.kind,
        "n_lines": report.n_lines,
        "n_errors": report.n_errors,
        "tokens_per_example": distribution(report.tokens),
        "messages_per_example": distribution(report.messages),
        "total_tokens": int(sum(report.tokens)),  # Python ints: no overflow
        "assistant_tokens": report.assistant_tokens,
        "n_over_token_limit": report.finding_counts.get("warning:too_many_tokens", 0),
        "example_token_limit": report.model.example_token_limit,
        "labels": dict(report.label_counts.most_common()) if report.label_counts else None,
        "job": {
            "n_epochs": cost.n_epochs,
            "epochs_rule": cost.epochs_rule,
            "billed_tokens": cost.billed_tokens,
            "price_per_million_usd": report.model.price_per_million,
            "cost_usd": cost.usd,
        },
    }
