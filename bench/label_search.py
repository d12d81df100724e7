"""Which local training settings make a good labeller? A cross-validated search on training issues only.

    python bench/label_search.py --train issues.jsonl --workdir DIR [--folds 3] [--epochs 5] [--max-length 512]
    python bench/label_search.py --train issues.jsonl --workdir DIR --report     # the table so far

The training file (a classification file as ``prepare --split`` writes it; its held-out part is
never read here) is split into ``--folds`` stratified folds (seed 0). Each configuration of
``CONFIGS`` (six: one run on the real sample takes about 40 minutes on 2 cores) trains
on all folds but one, for ``--epochs`` epochs, and after every epoch the model in training scores
the left-out fold with label-constrained prediction (``local.scoring``, the candidates being the
label sets of the fold's training part, as a job records them) and the trainer measures that
fold's validation loss. So one run gives every epoch count from 1 to ``--epochs``, and two ways of
choosing it: a fixed epoch count, or the epoch of lowest validation loss (what a job with a
validation file can do on its own).

The search is successive halving, so its cost fits the machine: stage 1 runs every configuration
on fold 0; stage 2 runs the ``--keep`` best of stage 1 (by their best epoch's macro-F1; today's
classification default always kept as the reference) on the other folds. Each run is one fresh process (the
allocator jobs preload, tcmalloc here) whose result is written when it ends: the search resumes
where it stopped, rerunning only an unfinished run. ``max_length`` is lowered for the search
(384: half of the sample's issues whole, the others shortened in the middle of their body; a run
of five epochs then takes about 40 minutes, a fifth of it scoring), as the issue allows; the final figure is a default job
at full length on the held-out issues, with the project's own ``eval``.

The report pools each configuration's predictions over the folds it ran on (every training
issue scored once, by a model that did not train on it), with a bootstrap interval of its
macro-F1 and paired intervals against the classification default and TF-IDF + logistic
regression fitted on the same folds. It goes to stdout and RESULTS/search.md; each run's record
(the left-out fold's reference labels and every epoch's predicted labels, no issue text) to
RESULTS/runs/, by default bench/results/label_search/ in this repository: a run costs the better
part of an hour, and a search spread over several sessions kept losing finished runs with the
machine they ran on. Records are tied to their fold by its digest, so a record from another split
is refused rather than pooled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")

# name -> settings; "attn-r8" is the general default job, "all-r16" the classification default
# (contract.CLASSIFICATION_DEFAULTS) and so the reference stage 2 always runs. Chosen from
# published LoRA guidance (every linear layer, a learning rate about ten times full
# fine-tuning's, more epochs on a few hundred examples) and this project's first measurement
# (all linear, r 16: 0.750 against 0.635).
CONFIGS: dict[str, dict[str, Any]] = {
    "all-r16": {"targets": ALL_LINEAR, "r": 16, "alpha": 32, "lr": 1e-3, "batch": 8},
    "attn-r8": {"targets": ATTENTION, "r": 8, "alpha": 16, "lr": 1e-3, "batch": 8},
    "all-r8": {"targets": ALL_LINEAR, "r": 8, "alpha": 16, "lr": 1e-3, "batch": 8},
    "all-r16-lr2e-3": {"targets": ALL_LINEAR, "r": 16, "alpha": 32, "lr": 2e-3, "batch": 8},
    "all-r16-lr5e-4": {"targets": ALL_LINEAR, "r": 16, "alpha": 32, "lr": 5e-4, "batch": 8},
    "attn-r16-lr2e-3": {"targets": ATTENTION, "r": 16, "alpha": 32, "lr": 2e-3, "batch": 8},
}
DEFAULT = "all-r16"
# fold -> sha256 of its left-out file, so a record from another split is refused, not pooled
FOLD_DIGESTS: dict[int, str] = {}


def describe(name: str) -> str:
    c = CONFIGS[name]
    layers = "all linear" if c["targets"] == ALL_LINEAR else "attention"
    return f"{layers}, r {c['r']} / alpha {c['alpha']}, lr {c['lr']:g}, batch {c['batch']}"


# ---- data -----------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def answer(row: dict[str, Any]) -> str:
    return str([m for m in row["messages"] if m["role"] == "assistant"][-1]["content"])


def make_folds(train: Path, workdir: Path, k: int) -> list[tuple[Path, Path]]:
    """Stratified folds of the training file, written once (a resumed search reuses them)."""
    from sklearn.model_selection import StratifiedKFold

    rows = read_rows(train)
    out = []
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=0).split(rows, [answer(r) for r in rows])
    for i, (tr, va) in enumerate(folds):
        paths = (workdir / "folds" / f"fold{i}.train.jsonl", workdir / "folds" / f"fold{i}.valid.jsonl")
        if not paths[0].exists():
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            for path, idx in zip(paths, (tr, va)):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(rows[j]) + "\n" for j in idx), encoding="utf-8")
                tmp.replace(path)
        out.append(paths)
    return out


# ---- one run (a child process) ------------------------------------------------------------------
def run_one(args: argparse.Namespace) -> None:
    """Train one configuration on one fold; score the left-out fold after every epoch."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from gpt_finetune.local.scoring import score_choices
    from gpt_finetune.local.trainer import Hooks, TrainSpec, train
    from gpt_finetune.worker.allocator import prepare_process

    c = CONFIGS[args.run]
    train_path, valid_path = Path(args.fold_train), Path(args.fold_valid)
    valid = read_rows(valid_path)
    choices = list(dict.fromkeys(answer(r) for r in read_rows(train_path)))
    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in valid]
    refs = [answer(r) for r in valid]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    epochs: list[dict[str, Any]] = []
    losses: dict[int, float] = {}
    started = time.time()

    class Score(TrainerCallback):  # type: ignore[misc]
        def on_epoch_end(self, _args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            from gpt_finetune.local.packing import PACKED_SDPA

            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            was_training = model.training
            model.eval()
            # packed attention is for training rows; scoring runs a cache and a padded tail
            base.set_attn_implementation("sdpa")
            t0 = time.time()
            picks, probs = [], []
            with torch.inference_mode():
                for p in prompts:
                    s = score_choices(model, tokenizer, p, choices, args.max_length)
                    best = max(range(len(s)), key=s.__getitem__)
                    top = max(s)
                    z = sum(pow(2.718281828459045, x - top) for x in s)
                    picks.append(choices[best])
                    probs.append(1.0 / z)
            base.set_attn_implementation(PACKED_SDPA)
            base.config._attn_implementation = PACKED_SDPA
            if was_training:
                model.train()
            epochs.append(
                {
                    "epoch": round(state.epoch),
                    "step": state.global_step,
                    "predictions": picks,
                    "confidence": probs,
                    "score_seconds": time.time() - t0,
                    "elapsed": time.time() - started,
                }
            )
            print(f"epoch {round(state.epoch)}: scored {len(picks)} in {time.time() - t0:.0f} s", flush=True)

        def on_evaluate(self, _args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any) -> None:
            if metrics and "eval_loss" in metrics:
                losses[round(state.epoch)] = float(metrics["eval_loss"])

    out = Path(args.out)
    spec = TrainSpec(
        model_dir=args.model_dir,
        training_file=str(train_path),
        validation_file=str(valid_path),
        output_dir=str(args.workdir / "ckpt" / f"{out.stem}.ckpt"),
        final_dir=str(args.workdir / "ckpt" / f"{out.stem}.final"),
        n_epochs=args.epochs,
        batch_size=c["batch"],
        learning_rate=c["lr"],
        seed=0,
        lora={"r": c["r"], "alpha": c["alpha"], "dropout": 0.05, "target_modules": list(c["targets"])},
        max_length=args.max_length,
        allocator=prepare_process()[0],
    )
    result = train(spec, Hooks(on_message=lambda text: print(text, flush=True)), [Score()])
    for e in epochs:
        e["valid_loss"] = losses.get(e["epoch"])
    record = {
        "config": args.run,
        "settings": {**c, "targets": list(c["targets"])},
        "fold": args.fold,
        "fold_sha256": _sha256(valid_path),
        "max_length": args.max_length,
        "references": refs,
        "epochs": epochs,
        "seconds": time.time() - started,
        "real_tokens": result.tokens_seen,
        "peak_rss": _peak_rss(),
        "plan": result.plan,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(out)
    import shutil

    shutil.rmtree(spec.output_dir, ignore_errors=True)
    shutil.rmtree(spec.final_dir, ignore_errors=True)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the search --------------------------------------------------------------------------------
def result_path(results: Path, name: str, fold: int) -> Path:
    return results / "runs" / f"{name}-f{fold}.json"


def load(results: Path, name: str, fold: int) -> dict[str, Any] | None:
    path = result_path(results, name, fold)
    if not path.exists():
        return None
    record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    want = FOLD_DIGESTS.get(fold)
    if want is not None and record.get("fold_sha256") not in (None, want):
        # A record of another training file or split: pooling it would pair different issues.
        sys.exit(f"{path}: scored a different fold {fold} than this training file gives; move it away")
    return record


def best_epoch_f1(record: dict[str, Any], labels: list[str]) -> float:
    return max(macro_f1(record["references"], e["predictions"], labels) for e in record["epochs"])


def macro_f1(refs: list[str], preds: list[str], labels: list[str]) -> float:
    from gpt_finetune.eval.metrics import classification_metrics

    return float(classification_metrics(_labels(refs), _labels(preds), labels)["macro_f1"])


def _labels(answers: list[str]) -> list[list[str]]:
    from gpt_finetune.data.labels import parse_labels

    return [parse_labels(a) for a in answers]


def schedule(results: Path, folds: int, keep: int, labels: list[str]) -> list[tuple[str, int]]:
    """Stage 1: every configuration on fold 0; stage 2 (once stage 1 is complete): the best
    ``keep`` and the default on the other folds."""
    todo = [(name, 0) for name in CONFIGS if load(results, name, 0) is None]
    if todo:
        return todo
    ranked = sorted(CONFIGS, key=lambda n: -best_epoch_f1(load(results, n, 0) or {}, labels))
    chosen = list(dict.fromkeys([*ranked[:keep], DEFAULT]))
    return [(n, f) for f in range(1, folds) for n in chosen if load(results, n, f) is None]


def search(args: argparse.Namespace, folds: list[tuple[Path, Path]], labels: list[str]) -> None:
    from gpt_finetune.worker.allocator import allocator_env

    env = dict(os.environ)
    env.update(allocator_env(env))
    while todo := schedule(args.results, args.folds, args.keep, labels):
        name, fold = todo[0]
        out = result_path(args.results, name, fold)
        out.parent.mkdir(parents=True, exist_ok=True)
        log = args.workdir / "logs" / f"{name}-f{fold}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {name} ({describe(name)}), fold {fold}: log {log}", flush=True)
        if running := _running(name, fold):  # a search started before this one (restarted): wait for it
            print(f"  already running as process {running}: waiting for it", flush=True)
            while _running(name, fold):
                time.sleep(30)
            continue
        cmd = [
            sys.executable, __file__, "--run", name, "--fold", str(fold),
            "--fold-train", str(folds[fold][0]), "--fold-valid", str(folds[fold][1]),
            "--out", str(out), "--epochs", str(args.epochs), "--max-length", str(args.max_length),
            "--model-dir", args.model_dir, "--workdir", str(args.workdir),
        ]  # fmt: skip
        t0 = time.time()
        with log.open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not out.exists():
            sys.exit(f"{name} fold {fold} failed (exit {rc}); see {log}")
        print(f"  done in {time.time() - t0:.0f} s", flush=True)
        report(args, folds, labels)


def _running(name: str, fold: int) -> int | None:
    """The pid of a child run of this configuration and fold still in progress, if any."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "--run" in cmd and name in cmd and "--fold" in cmd and str(fold) in cmd and proc.pid != os.getpid():
            if cmd[cmd.index("--run") + 1] == name and cmd[cmd.index("--fold") + 1] == str(fold):
                return int(proc.pid)
    return None


# ---- the report ---------------------------------------------------------------------------------
def tfidf_predictions(folds: list[tuple[Path, Path]], fold: int) -> list[str]:
    from gpt_finetune.data.labels import format_labels
    from gpt_finetune.eval.baseline import TfidfBaseline

    def texts(rows: list[dict[str, Any]]) -> list[str]:
        return [" \n".join(m["content"] for m in r["messages"] if m["role"] in ("system", "user")) for r in rows]

    tr, va = read_rows(folds[fold][0]), read_rows(folds[fold][1])
    ys = _labels([answer(r) for r in tr])
    label_set = sorted({x for y in ys for x in y})
    model = TfidfBaseline().fit(texts(tr), ys, label_set)
    return [format_labels(p, "seed") for p in model.predict(texts(va))]


def interval(refs: list[str], preds: list[str], labels: list[str], other: list[str] | None = None) -> str:
    """The macro-F1 (or its difference from ``other``'s) with a 95 % bootstrap interval."""
    from gpt_finetune.eval.metrics import bootstrap_macro_f1_difference

    r, a = _labels(refs), _labels(preds)
    if other is None:
        nothing: list[list[str] | None] = [[] for _ in r]
        d, lo, hi = bootstrap_macro_f1_difference(r, a, nothing, labels)  # type: ignore[arg-type]
        return f"{d:.3f} ({lo:.3f}-{hi:.3f})"
    d, lo, hi = bootstrap_macro_f1_difference(r, a, _labels(other), labels)  # type: ignore[arg-type]
    return f"{d:+.3f} ({lo:+.3f} to {hi:+.3f})"


def report(args: argparse.Namespace, folds: list[tuple[Path, Path]], labels: list[str]) -> str:
    """Per configuration: macro-F1 at each epoch on fold 0, then pooled over the folds it ran on
    at a fixed epoch and at the epoch of lowest validation loss."""
    lines = [
        f"Cross-validated search: {len(folds)} stratified folds of {args.train.name}, max_length "
        f"{args.max_length}, {args.epochs} epochs, label-constrained macro-F1 on the left-out fold.",
        "",
        "Stage 1 (fold 0): macro-F1 after each epoch (validation loss)",
        "",
        "| configuration | " + " | ".join(f"epoch {e}" for e in range(1, args.epochs + 1)) + " | time | peak RSS |",
        "|---|" + "---:|" * (args.epochs + 2),
    ]
    for name in CONFIGS:
        rec = load(args.results, name, 0)
        if rec is None:
            continue
        cells = [
            f"{macro_f1(rec['references'], e['predictions'], labels):.3f} ({e['valid_loss']:.3f})"
            if e.get("valid_loss") is not None
            else f"{macro_f1(rec['references'], e['predictions'], labels):.3f}"
            for e in rec["epochs"]
        ]
        lines.append(
            f"| {name}: {describe(name)} | " + " | ".join(cells)
            + f" | {rec['seconds'] / 60:.1f} min | {rec['peak_rss'] / 1e9:.2f} GB |"
        )  # fmt: skip
    # pooled over the folds each configuration ran on; compared with the default (and TF-IDF) on
    # those same folds, where the default has run them
    lines += [
        "",
        "Pooled over the folds each ran on (each issue scored by a model that did not train on it); "
        "95 % bootstrap intervals, differences paired on the same issues:",
        "",
        "| configuration | folds (issues) | epochs | macro-F1 | minus default (same epochs rule) | minus TF-IDF |",
        "|---|---|---|---:|---:|---:|",
    ]
    rules: list[tuple[str, Any]] = [
        (f"fixed {e}", lambda r, e=e: r["epochs"][e - 1]) for e in range(1, args.epochs + 1)
    ]
    rules.append(("lowest validation loss", lambda r: min(r["epochs"], key=lambda e: e.get("valid_loss") or 9e9)))
    tfidf_rows: dict[int, list[str]] = {}
    for name in [DEFAULT, *[n for n in CONFIGS if n != DEFAULT]]:
        ran = [f for f in range(len(folds)) if load(args.results, name, f)]
        if not ran:
            continue
        recs = [load(args.results, name, f) or {} for f in ran]
        refs = [x for r in recs for x in r["references"]]
        for f in ran:
            tfidf_rows.setdefault(f, tfidf_predictions(folds, f))
        tfidf = [x for f in ran for x in tfidf_rows[f]]
        base = [load(args.results, DEFAULT, f) for f in ran]
        where = f"{', '.join(map(str, ran))} ({len(refs)})"
        for rule_name, rule in rules:
            preds = [p for r in recs for p in rule(r)["predictions"]]
            diff = ""
            if name != DEFAULT and all(b is not None for b in base):
                diff = interval(refs, preds, labels, [p for b in base for p in rule(b)["predictions"]])  # type: ignore[arg-type]
            lines.append(
                f"| {name} | {where} | {rule_name} | {interval(refs, preds, labels)} | {diff} | "
                f"{interval(refs, preds, labels, tfidf)} |"
            )
        lines.append(f"| TF-IDF + logistic regression | {where} | | {interval(refs, tfidf, labels)} | | |")
    text = "\n".join(lines) + "\n"
    (args.results / "search.md").write_text(text, encoding="utf-8")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, help="the training file (prepare --split's first output)")
    ap.add_argument("--workdir", type=Path, help="folds, logs and checkpoints (they hold issue text: not committed)")
    ap.add_argument(
        "--results", type=Path, default=HERE / "results" / "label_search",
        help="each run's record and the report (labels and figures only; committed, so a search "
        "outlives the machine it ran on)",
    )  # fmt: skip
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--keep", type=int, default=1, help="configurations stage 2 runs on the other folds")
    ap.add_argument("--model-dir", default=None, help="the base model's directory (default: the converted default)")
    ap.add_argument("--configs", help="comma-separated names of CONFIGS to search (default: all)")
    ap.add_argument("--report", action="store_true", help="print the table of what has run, run nothing")
    # a child run
    for flag in ("--run", "--fold-train", "--fold-valid", "--out"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--fold", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        run_one(args)
        return
    if args.configs:
        for name in set(CONFIGS) - set(args.configs.split(",")):
            del CONFIGS[name]
    if args.model_dir is None:
        from gpt_finetune.base_catalog import resolve_base
        from gpt_finetune.home import Home
        from gpt_finetune.local.base_weights import model_dir

        # Converted from the packaged GGUF on first use, as a job does.
        args.model_dir = str(model_dir(resolve_base("SmolLM2-135M-Instruct"), Home()))
    args.workdir.mkdir(parents=True, exist_ok=True)
    folds = make_folds(args.train, args.workdir, args.folds)
    FOLD_DIGESTS.update({i: _sha256(valid) for i, (_train, valid) in enumerate(folds)})
    args.results.mkdir(parents=True, exist_ok=True)
    labels = sorted({x for r in read_rows(args.train) for x in _labels([answer(r)])[0]})
    if not args.report:
        search(args, folds, labels)
    print(report(args, folds, labels))


if __name__ == "__main__":
    main()
