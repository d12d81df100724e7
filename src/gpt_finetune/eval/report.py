"""Reports of an evaluation: a table for the terminal, and Markdown with PNG plots (confusion
matrices, per-label F1, the job's loss curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def read_eval_json(path: Path) -> dict[str, Any]:
    """What ``gpt-finetune eval --json`` printed (``data``, ``task``, ``results`` by model name),
    read back for a model card; one error naming the file when it is not that."""
    import json

    from ..errors import ConfigError

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise ConfigError(f"{path}: not what gpt-finetune eval --json writes (no results by model)")
    return {**doc, "path": str(path)}


def table(results: dict[str, dict[str, Any]], task: str) -> str:
    if task == "classification":
        cols = [
            ("accuracy", "accuracy"),
            ("macro_f1", "macro-F1"),
            ("micro_f1", "micro-F1"),
            ("out_of_set_rate", "outside set"),
        ]
        if any(r.get("multi_label") for r in results.values()):
            cols += [("samples_f1", "samples F1"), ("samples_jaccard", "Jaccard"), ("hamming_loss", "Hamming")]
    else:
        cols = [("exact_match", "exact"), ("token_f1", "token F1"), ("rouge_l", "ROUGE-L"), ("answer_words", "words")]
    width = max([len(n) for n in results] + [5])
    head = "model".ljust(width) + "".join(f"  {label:>11}" for _, label in cols)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = "".join(f"  {r[key]:>11.3f}" if isinstance(r.get(key), float) else f"  {'-':>11}" for key, _ in cols)
        lines.append(name.ljust(width) + cells)
        if "vs_first" in r:
            other, d, lo, hi = r["vs_first"]
            lines.append(" " * width + f"  macro-F1 vs {other}: {d:+.3f} (95 % interval {lo:+.3f} to {hi:+.3f})")
        if "vs_baseline" in r:
            d, lo, hi = r["vs_baseline"]
            against = f"the better baseline ({r['baseline']})" if r.get("baseline") else "the baseline"
            lines.append(" " * width + f"  macro-F1 vs {against}: {d:+.3f} (95 % interval {lo:+.3f} to {hi:+.3f})")
        if "unseen_sets" in r:
            u = r["unseen_sets"]
            lines.append(
                " " * width + f"  label sets not seen in training: answered {u['answered']} times; "
                f"{u['right']} of the {u['references']} examples that have one answered exactly"
            )
        if "calibration" in r:
            cal = r["calibration"]
            kept = ", ".join(
                f">= {a['threshold']:g}: {a['coverage']:.0%} of answers, accuracy "
                + (f"{a['accuracy']:.3f}" if a["accuracy"] is not None else "-")
                for a in cal["at_threshold"]
            )
            lines.append(" " * width + f"  calibration error {cal['ece']:.3f}; confidence {kept}")
    return "\n".join(lines)


def per_label_table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    labels = next(iter(results.values()))["labels"]
    width = max([len(x) for x in labels] + [5])
    lines = ["label".ljust(width) + "".join(f"  {n[:18]:>18}" for n in names)]
    for label in labels:
        lines.append(label.ljust(width) + "".join(f"  {results[n]['per_label'][label]['f1']:>18.3f}" for n in names))
    return "per-label F1\n" + "\n".join(lines)


def write_report(
    directory: str | Path,
    results: dict[str, dict[str, Any]],
    task: str,
    *,
    data: str,
    curves: list[dict[str, Any]] | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Evaluation on {data}\n", "```", table(results, task), "```\n"]
    if task == "classification":
        parts += ["```", per_label_table(results), "```\n"]
        labels = next(iter(results.values()))["labels"]
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) * len(results) / 2), 3.5 + 0.2 * len(results)))
        w = 0.8 / len(results)
        for i, (name, r) in enumerate(results.items()):
            ax.bar([k + i * w for k in range(len(labels))], [r["per_label"][x]["f1"] for x in labels], w, label=name)
        ax.set_xticks([k + 0.4 - w / 2 for k in range(len(labels))], labels, rotation=30, ha="right")
        ax.set_ylabel("F1")
        ax.set_ylim(0, 1)
        # below the axes: inside, it hides the bars it names
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
        ax.set_title("per-label F1")
        fig.tight_layout()
        fig.savefig(out / "per_label_f1.png", dpi=110)
        plt.close(fig)
        parts.append("![per-label F1](per_label_f1.png)\n")
        for name, r in results.items():
            if "confusion_matrix" not in r:
                continue
            cm = r["confusion_matrix"]
            fig, ax = plt.subplots(figsize=(4.5, 4))
            ax.imshow(cm["matrix"], cmap="Blues")
            ticks = range(len(cm["labels"]))
            ax.set_xticks(ticks, cm["labels"], rotation=30, ha="right")
            ax.set_yticks(ticks, cm["labels"])
            for i, row in enumerate(cm["matrix"]):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
            ax.set_xlabel("predicted")
            ax.set_ylabel("reference")
            ax.set_title(name[:60], fontsize=8)
            fig.tight_layout()
            png = f"confusion_{_safe(name)}.png"
            fig.savefig(out / png, dpi=110)
            plt.close(fig)
            parts.append(f"![confusion matrix of {name}]({png})\n")
    calibrated = {name: r["calibration"] for name, r in results.items() if "calibration" in r}
    if calibrated:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
        for name, cal in calibrated.items():
            xs = [b["confidence"] for b in cal["bins"]]
            ax.plot(xs, [b["accuracy"] for b in cal["bins"]], marker="o", label=f"{name[:40]} (ECE {cal['ece']:.3f})")
            for b in cal["bins"]:  # how many answers each point stands for: few is noise
                ax.annotate(
                    f"n={b['n']}",
                    (b["confidence"], b["accuracy"]),
                    fontsize=6,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
        ax.set_xlabel("confidence of the chosen answer")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title("reliability")
        fig.tight_layout()
        fig.savefig(out / "reliability.png", dpi=110)
        plt.close(fig)
        parts.append("![reliability of the confidences](reliability.png)\n")
    if curves:
        from ..curves import plot_metrics

        plot_metrics(curves, out / "loss.png", title="training and validation loss")
        parts.append("![loss curves](loss.png)\n")
    report = out / "report.md"
    from ..atomic import write_text_atomic

    write_text_atomic(report, "\n".join(parts))
    return report
