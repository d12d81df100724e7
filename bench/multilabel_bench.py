"""Multi-label answers: label by label against choosing among the label sets seen in training.

    python bench/multilabel_bench.py --workdir DIR [--model SmolLM2-135M-Instruct]

Data: the bundled example issues (``src/gpt_finetune/examples/issues.json``: written for this
project, not real issues; 8 single labels of 20 issues each and 8 label pairs of 5). The split
holds four of the eight pairs out of training entirely, so the test set has label sets that
constrained prediction (which chooses among the sets seen in training) cannot answer:

- test: all 20 issues of the held-out pairs, 2 of each other pair, 5 of each single label (68);
- validation (the job's validation file, and where thresholds are tuned): 1 of each seen pair,
  2 of each single label (20);
- training: the rest (112: 13 per single label, 2 per seen pair).

Everything runs through the real entry point, as a user would: ``prepare`` each part,
``finetune --backend local`` with the job's defaults, then ``eval --mode all --tune-on`` the
validation file with both baselines. The table adds a paired bootstrap interval (1,000
resamples of the test issues) of samples-averaged F1 between label by label and constrained.
Results go to DIR/multilabel.md and DIR/eval.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "src" / "gpt_finetune" / "examples"
SYS_PROMPT = "Label this Antrea GitHub issue with its area labels."


def split(records: list[dict[str, Any]], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    by_set: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_set.setdefault(r["conversations"][1]["value"], []).append(r)
    rng = random.Random(seed)
    pairs = sorted(k for k in by_set if "," in k)
    held_out = set(rng.sample(pairs, 4))
    parts: dict[str, list[dict[str, Any]]] = {"train": [], "valid": [], "test": []}
    for key in sorted(by_set):
        group = by_set[key][:]
        rng.shuffle(group)
        if key in held_out:
            parts["test"] += group
        elif "," in key:
            parts["test"] += group[:2]
            parts["valid"] += group[2:3]
            parts["train"] += group[3:]
        else:
            parts["test"] += group[:5]
            parts["valid"] += group[5:7]
            parts["train"] += group[7:]
    return parts


def run(cmd: list[str], **kw: Any) -> str:
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def samples_f1(refs: list[list[str]], preds: list[list[str] | None]) -> list[float]:
    out = []
    for r, p in zip(refs, preds, strict=True):
        p = p or []
        tp = len(set(r) & set(p))
        out.append(2 * tp / (len(set(r)) + len(set(p))) if r or p else 1.0)
    return out


def paired(a: list[float], b: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    import numpy as np

    d = np.array(a) - np.array(b)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--home", help="the data directory jobs use (default: the user's)")
    args = ap.parse_args()
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "gpt_finetune"]
    home = ["--home", args.home] if args.home else []
    parts = split(json.loads((EXAMPLES / "issues.json").read_text(encoding="utf-8")))
    for name, rows in parts.items():
        raw = w / f"{name}.raw.json"
        raw.write_text(json.dumps(rows), encoding="utf-8")
        if not (w / f"{name}.jsonl").exists():  # a rerun reuses the prepared files and the job
            run([*cli, "prepare", "-i", str(raw), "-o", str(w / f"{name}.jsonl"), "--task-type", "classification",
                 "--sys-prompt", SYS_PROMPT])  # fmt: skip
    t0 = time.time()
    job_file = w / "job.json"
    if not job_file.exists():
        job_id = run([*cli, "finetune", *home, "--backend", "local", "-d", str(w / "train.jsonl"),
                      "-v", str(w / "valid.jsonl"), "-m", args.model, "--suffix", "multilabel", "--wait"]).split()[0]  # fmt: skip
        job_file.write_text(run([*cli, "jobs", "get", *home, "--backend", "local", job_id, "--json"]), encoding="utf-8")
    job = json.loads(job_file.read_text(encoding="utf-8"))
    if job["status"] != "succeeded":
        sys.exit(f"job {job['id']} {job['status']}")
    train_s = (job["finished_at"] - job["created_at"]) if job.get("finished_at") else time.time() - t0
    model = job["fine_tuned_model"]
    t0 = time.time()
    out = run([*cli, "eval", *home, "--backend", "local", "-m", model, "-d", str(w / "test.jsonl"),
               "--train", str(w / "train.jsonl"), "--labels", str(w / "train.labels.json"), "--mode", "all",
               "--tune-on", str(w / "valid.jsonl"), "--baseline", "both", "--json", "--report", str(w / "report")])  # fmt: skip
    eval_s = time.time() - t0
    (w / "eval.json").write_text(out, encoding="utf-8")
    report(w, json.loads(out), job, train_s, eval_s)


def report(w: Path, result: dict[str, Any], job: dict[str, Any], train_s: float, eval_s: float) -> None:
    from gpt_finetune.data.labels import parse_labels

    test = [json.loads(x) for x in (w / "test.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    refs = [parse_labels(r["messages"][-1]["content"]) for r in test]
    results = result["results"]
    preds = result.get("predictions") or {}
    lines = [
        f"Test issues: {len(refs)} ({sum(len(r) > 1 for r in refs)} with two labels); fine-tuned model {job['fine_tuned_model']}"
        f" (training {train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min)",
        "",
        "| answers | samples F1 | macro-F1 | exact | Jaccard | label sets unseen in training: answered / right of |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        u = r.get("unseen_sets", {})
        lines.append(
            f"| {name} | {r['samples_f1']:.3f} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} | {r['samples_jaccard']:.3f} | "
            f"{u.get('answered', '-')} / {u.get('right', '-')} of {u.get('references', '-')} |"
        )
    by_kind = {
        k: n for n in preds for k in ("constrained", "labels", "labels, tuned thresholds") if n.endswith(f"({k})")
    }
    if "constrained" in by_kind and "labels" in by_kind:
        sf = {k: samples_f1(refs, preds[n]) for k, n in by_kind.items()}
        for k in [x for x in ("labels", "labels, tuned thresholds") if x in sf]:
            d, lo, hi = paired(sf[k], sf["constrained"])
            lines.append(f"\nsamples F1, {k} minus constrained: {d:+.3f} (95 % interval {lo:+.3f} to {hi:+.3f})")
    for r in results.values():
        if "thresholds" in r:
            cuts = ", ".join(f"{k} {v:.2f}" for k, v in r["thresholds"].items())
            lines.append(f"\nthresholds tuned on the validation file: {cuts}")
    text = "\n".join(lines) + "\n"
    (w / "multilabel.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
