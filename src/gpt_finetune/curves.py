"""Pictures of a job: the loss and accuracy curves from its metrics events, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(events: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Plot train/valid loss and token accuracy by step. ``events`` are metrics ``data`` dicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for d in events:
        for key in ("train_loss", "valid_loss", "train_mean_token_accuracy", "valid_mean_token_accuracy"):
            if d.get(key) is not None:
                series.setdefault(key, []).append((int(d["step"]), float(d[key])))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax in (
        ("train_loss", ax1),
        ("valid_loss", ax1),
        ("train_mean_token_accuracy", ax2),
        ("valid_mean_token_accuracy", ax2),
    ):
        if key in series:
            xs, ys = zip(*sorted(series[key]))
            ax.plot(
                xs,
                ys,
                marker="o" if key.startswith("valid") else None,
                markersize=4,
                label=key.replace("_mean_token", "").replace("_", " "),
            )
    ax1.set_title("loss (assistant tokens)")
    ax2.set_title("next-token accuracy (assistant tokens)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
