"""``eval`` on a preference file: how often each model prefers the chosen answer of a pair.

A model prefers the chosen answer when it gives it the higher log-probability as the answer to
the pair's input; the margin is the difference (in nats). The figures come through the backend's
chat API, as every other evaluation here does: a request constrained to the pair's two answers
with ``logprobs`` returns each answer's log-probability among the two (``top_logprobs``), whose
difference is exactly the difference of their summed log-probabilities. So the same command
scores models on the local engine and on a server of ours; a server that ignores the constraint
(or returns no logprobs) is refused with a clear error rather than scored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.checks import first_example_kind
from ..data.readers import loads
from ..errors import BackendError, DataError
from ..request_rules import choice_constraint, ignored_constraint

BOOTSTRAP = 2000


@dataclass
class Pair:
    messages: list[dict[str, Any]]
    chosen: str
    rejected: str


def is_preference_file(path: str | Path) -> bool:
    """Whether a JSONL file's first example is a preference pair (OpenAI's DPO format)."""
    return first_example_kind(path) == "preference"


def read_pairs(path: str | Path) -> list[Pair]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = loads(line)
                pair = Pair(
                    list(row["input"]["messages"]),
                    str(row["preferred_output"][0]["content"]),
                    str(row["non_preferred_output"][0]["content"]),
                )
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                raise DataError(
                    "not a preference pair (input.messages, preferred_output, non_preferred_output)",
                    path=path,
                    line=n,
                    hint=f"check it with: gpt-finetune validate {path}",
                ) from None
            out.append(pair)
    if not out:
        raise DataError("no preference pairs", path=path)
    return out


def margins(backend: Any, model: str, pairs: list[Pair], progress: Any = None) -> list[float]:
    """Each pair's log-probability of the chosen answer less that of the other, under ``model``."""
    out = []
    for pair in pairs:
        choices = [pair.chosen, pair.rejected]
        response = backend.chat(
            model=model,
            messages=pair.messages,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            extra_body=choice_constraint(choices),
        )
        answer = response.choices[0].message.content or ""
        if error := ignored_constraint(answer, [c.strip() for c in choices], model):
            raise error
        logprobs = getattr(response.choices[0], "logprobs", None)
        content = getattr(logprobs, "content", None) if logprobs is not None else None
        found = {t.token: t.logprob for t in (content[0].top_logprobs or [])} if content else {}
        if pair.chosen not in found or pair.rejected not in found:
            raise BackendError(
                f"{model}: the server returned no log-probabilities of both answers of a pair",
                hint="preference evaluation needs the local backend or gpt-finetune serve",
            )
        out.append(float(found[pair.chosen] - found[pair.rejected]))
        if progress is not None:
            progress.update(1)
    return out


def _interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOTSTRAP))
    return means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


def summary(margins_: list[float], first: list[float] | None = None) -> dict[str, Any]:
    """Preference accuracy and mean margin with 95 % bootstrap intervals; with ``first`` (the
    first model's margins on the same pairs), the paired difference in accuracy."""
    hits = [1.0 if m > 0 else 0.0 for m in margins_]
    out: dict[str, Any] = {
        "n_pairs": len(margins_),
        "preference_accuracy": sum(hits) / len(hits),
        "preference_accuracy_95": list(_interval(hits)),
        "mean_margin": sum(margins_) / len(margins_),
        "mean_margin_95": list(_interval(margins_)),
    }
    if first is not None:
        diff = [h - (1.0 if f > 0 else 0.0) for h, f in zip(hits, first, strict=True)]
        out["accuracy_vs_first"] = [sum(diff) / len(diff), *_interval(diff)]
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | pairs | prefers the chosen answer (95 %) | mean margin, nats (95 %) | vs first |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lo, hi = r["preference_accuracy_95"]
        mlo, mhi = r["mean_margin_95"]
        vs = r.get("accuracy_vs_first")
        lines.append(
            f"| {name} | {r['n_pairs']} | {r['preference_accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{r['mean_margin']:+.2f} ({mlo:+.2f} to {mhi:+.2f}) | "
            + (f"{vs[0]:+.3f} ({vs[1]:+.3f} to {vs[2]:+.3f})" if vs else "")
            + " |"
        )
    return "\n".join(lines)
