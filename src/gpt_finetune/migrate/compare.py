"""``migrate compare``: the local model against the old model's recorded answers.

For every recorded prompt the local model answers greedily, as the old one was asked. Reported:
exact agreement; for classification (label sets found as ``eval`` finds them: the answers are
labels by the rule jobs use) per-label agreement and macro-F1 with the recordings taken as the
reference; where the prompts came with references (a validation file), both models' scores
against them and the paired bootstrap interval of their macro-F1 difference, as ``eval`` gives;
for answering data token F1 and ROUGE-L against the recordings; the local latency and tokens per
second; and what the recorded prompts cost on OpenAI (its dated fine-tuned inference prices).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..data.labels import LabelError, label_sets, parse_labels
from ..openai_facts import BATCH_DISCOUNT, model_info
from . import manifest as mf
from .record import prompts_path, recordings


def _labels(answer: str) -> list[str] | None:
    try:
        return parse_labels(answer)
    except LabelError:
        return None


def openai_cost(model_id: str, recorded: list[dict[str, Any]]) -> dict[str, Any]:
    """What the recorded requests cost on OpenAI, from their usage and the dated price table."""
    info = model_info(model_id)
    prompt = sum(int((r.get("usage") or {}).get("prompt_tokens") or 0) for r in recorded)
    completion = sum(int((r.get("usage") or {}).get("completion_tokens") or 0) for r in recorded)
    usd = None
    if info.input_price is not None and info.output_price is not None:
        usd = 0.0
        for r in recorded:
            usage = r.get("usage") or {}
            cost = (
                int(usage.get("prompt_tokens") or 0) * info.input_price
                + int(usage.get("completion_tokens") or 0) * info.output_price
            ) / 1e6
            usd += cost * (BATCH_DISCOUNT if r.get("via") == "batch" else 1.0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "usd": usd,
        "usd_per_1000_requests": usd / len(recorded) * 1000 if usd is not None and recorded else None,
        "prices": {"input": info.input_price, "output": info.output_price, "per": "1M tokens", "batch": BATCH_DISCOUNT},
    }


def compare(
    services: Any,
    root: Path,
    model: mf.Model,
    *,
    max_tokens: int = 256,
    report_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Compare and write ``compare.json`` and ``report.md`` (``compare/<key>/`` unless told)."""
    from ..errors import BackendError

    local_model = services.models.resolve(model.id)
    if local_model == model.id:
        raise BackendError(f"{model.id} has no local model yet", hint="retrain it first: gpt-finetune migrate retrain")
    rows = [json.loads(x) for x in prompts_path(root, model.key).read_text(encoding="utf-8").splitlines() if x.strip()]
    answers = recordings(root, model.key)
    rows = [r for r in rows if r["custom_id"] in answers]
    if not rows:
        raise BackendError(f"{model.id} has no recorded answers", hint="record them first: gpt-finetune migrate record")
    old = [answers[r["custom_id"]]["answer"].strip() for r in rows]
    new: list[str] = []
    latencies: list[float] = []
    tokens = 0
    for r in rows:
        started = time.perf_counter()
        completion = services.chat.start(
            {"model": local_model, "messages": r["messages"], "temperature": 0, "max_tokens": max_tokens}
        ).completion()
        latencies.append(time.perf_counter() - started)
        tokens += int(completion["usage"]["completion_tokens"])
        new.append((completion["choices"][0]["message"]["content"] or "").strip())
        if progress:
            progress(1)
    refs = [r.get("reference") for r in rows]
    with_refs = all(isinstance(x, str) for x in refs)
    out: dict[str, Any] = {
        "model": model.id,
        "local_model": local_model,
        "n": len(rows),
        "exact_agreement": sum(a == b for a, b in zip(old, new, strict=True)) / len(rows),
        "latency_s": {
            "mean": statistics.fmean(latencies),
            "p50": statistics.median(latencies),
            "p95": sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)],
        },
        "local_tokens_per_second": tokens / sum(latencies) if sum(latencies) > 0 else None,
        "openai_cost": openai_cost(model.id, [answers[r["custom_id"]] for r in rows]),
    }
    found = label_sets(old) or (label_sets([str(x) for x in refs]) if with_refs else None)
    old_labels = [_labels(a) for a in old]
    if found is not None and all(x is not None for x in old_labels):
        out.update(_classification(found, old_labels, new, [str(x) for x in refs] if with_refs else None))
    else:
        from ..eval.metrics import answering_metrics

        out["task"] = "answering"
        out["agreement"] = answering_metrics(old, new)
        if with_refs:
            out["vs_references"] = {
                "old": answering_metrics([str(x) for x in refs], old),
                "local": answering_metrics([str(x) for x in refs], new),
            }
    directory = Path(report_dir) if report_dir else root / "compare" / model.key
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "compare.json", json.dumps(out, indent=1) + "\n")
    write_report(directory, out, latencies)
    return out


def _classification(
    found: dict[str, Any], old_labels: list[list[str] | None], new: list[str], refs: list[str] | None
) -> dict[str, Any]:
    from ..eval.metrics import bootstrap_macro_f1_difference, classification_metrics

    olds = [x for x in old_labels if x is not None]
    labels = sorted(set(found["labels"]) | {x for ls in olds for x in ls})
    new_labels = [_labels(a) for a in new]
    out: dict[str, Any] = {"task": "classification", "labels": labels}
    out["agreement"] = classification_metrics(olds, new_labels, labels)  # the recordings as the reference
    if refs is not None:
        truth = [_labels(r) or [] for r in refs]
        out["vs_references"] = {
            "old": classification_metrics(truth, list(old_labels), labels),
            "local": classification_metrics(truth, new_labels, labels),
            "local_minus_old_macro_f1": list(
                bootstrap_macro_f1_difference(truth, new_labels, list(old_labels), labels)
            ),
        }
    return out


def summary(result: dict[str, Any]) -> list[str]:
    """The comparison in a few lines, for the terminal and the report."""
    lines = [
        f"{result['model']} -> {result['local_model']}: {result['n']} recorded prompts",
        f"  exact agreement with the old model: {result['exact_agreement']:.1%}",
    ]
    agreement = result["agreement"]
    if result.get("task") == "classification":
        lines.append(
            f"  label agreement (old answers as reference): macro-F1 {agreement['macro_f1']:.3f}, "
            f"label-set accuracy {agreement['accuracy']:.3f}"
        )
        vs = result.get("vs_references")
        if vs:
            d, lo, hi = vs["local_minus_old_macro_f1"]
            lines.append(
                f"  against the references: old macro-F1 {vs['old']['macro_f1']:.3f}, local {vs['local']['macro_f1']:.3f} "
                f"(local - old {d:+.3f}, 95 % interval {lo:+.3f} to {hi:+.3f})"
            )
    else:
        lines.append(
            f"  token F1 {agreement['token_f1']:.3f}, ROUGE-L {agreement['rouge_l']:.3f} against the old answers"
        )
    lat = result["latency_s"]
    tps = result["local_tokens_per_second"]
    lines.append(
        f"  local latency p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, {tps:.1f} output tokens/s"
        if tps is not None
        else f"  local latency p50 {lat['p50']:.2f} s"
    )
    cost = result["openai_cost"]
    if cost["usd"] is not None:
        lines.append(
            f"  on OpenAI these prompts cost ${cost['usd']:.4f} ({cost['prompt_tokens']:,} prompt + "
            f"{cost['completion_tokens']:,} completion tokens; ${cost['usd_per_1000_requests']:.3f} per 1,000 requests)"
        )
    return lines


def write_report(directory: Path, result: dict[str, Any], latencies: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [f"# {result['model']} moved to {result['local_model']}\n", "```", *summary(result), "```\n"]
    if result.get("task") == "classification":
        labels = result["labels"]
        series = {"agreement with the old model": result["agreement"]}
        if result.get("vs_references"):
            series["old model vs references"] = result["vs_references"]["old"]
            series["local model vs references"] = result["vs_references"]["local"]
        parts += ["| label | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
        for label in labels:
            parts.append(
                f"| {label} | " + " | ".join(f"{m['per_label'][label]['f1']:.3f}" for m in series.values()) + " |"
            )
        parts.append("\nPer-label F1 (the agreement column takes the old model's answers as the reference).\n")
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) * len(series)), 3.8))
        w = 0.8 / len(series)
        for i, (name, m) in enumerate(series.items()):
            ax.bar([k + i * w for k in range(len(labels))], [m["per_label"][x]["f1"] for x in labels], w, label=name)
        ax.set_xticks([k + 0.4 - w / 2 for k in range(len(labels))], labels, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("F1")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
        ax.set_title("per label: agreement with the old model, and both against the references", fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / "per_label.png", dpi=110)
        plt.close(fig)
        parts.append("![per-label agreement and scores](per_label.png)\n")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(latencies, bins=min(30, max(5, len(latencies) // 3)))
    ax.set_xlabel("seconds per answer (local)")
    ax.set_ylabel("prompts")
    ax.set_title("local latency", fontsize=9)
    fig.tight_layout()
    fig.savefig(directory / "latency.png", dpi=110)
    plt.close(fig)
    parts.append("![local latency](latency.png)\n")
    report = directory / "report.md"
    write_text_atomic(report, "\n".join(parts))
    return report
