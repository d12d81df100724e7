"""``eval``: models side by side on held-out data, against a TF-IDF baseline."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import ConfigError, DependencyError
from .common import add_config_flag, add_connection_flags, get_backend, info, settings_from


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="MODEL",
        help="a model to evaluate (repeatable): base, fine-tuned or checkpoint id",
    )
    p.add_argument(
        "-d",
        "--data",
        required=True,
        metavar="FILE",
        help="held-out chat JSONL (the last assistant message is the reference)",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="label set (prepare's .labels.json or a JSON list); default: the sidecar beside --data",
    )
    p.add_argument(
        "--task-type",
        dest="eval_task",
        choices=["classification", "answering"],
        help="default: classification when a label set is found, else answering",
    )
    p.add_argument(
        "--mode",
        choices=["free", "constrained", "labels", "both", "all"],
        default=None,
        help="classification: free generation, label-constrained (one of the label sets seen in training), "
        "label by label (any subset of the labels: multi-label data), both (free and constrained) or all "
        "three (default: both on the local backend, free otherwise)",
    )
    p.add_argument(
        "--baseline",
        choices=["tfidf", "svm", "both", "none"],
        default="tfidf",
        help="cheap baseline for classification: TF-IDF + logistic regression (default), word and character "
        "n-grams + linear SVM, or both (each model is then compared with the better of the two on this data)",
    )
    p.add_argument(
        "--train", metavar="FILE", help="training chat JSONL: fits the baseline and gives the candidate label sets"
    )
    p.add_argument("-j", "--job", dest="eval_job", metavar="JOB_ID", help="a job whose loss curves go in the report")
    p.add_argument("--max-tokens", dest="eval_max_tokens", type=int, default=64, help="free generation (default 64)")
    p.add_argument(
        "--batch-size",
        dest="eval_batch",
        type=int,
        default=8,
        help="local models: prompts generated at once (default 8)",
    )
    p.add_argument("--limit", dest="eval_limit", type=int, help="only the first N examples")
    p.add_argument("--report", metavar="DIR", help="write report.md and PNG plots there")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_config_flag(p)
    add_connection_flags(p)
    p.set_defaults(func=cmd_eval)


def default_batch() -> int:
    """8 prompts at once on a GPU; one at a time on CPU, where left-padded batches of real issues
    ran at half the speed of single prompts (bench/README.md)."""
    try:
        import torch
    except ImportError:
        return 1
    return 8 if torch.cuda.is_available() else 1


def cmd_eval(ns: argparse.Namespace) -> int:
    try:
        from ..eval import evaluate as ev
        from ..eval.metrics import (
            answering_metrics,
            bootstrap_macro_f1_difference,
            calibration,
            classification_metrics,
        )
    except ImportError as exc:  # scikit-learn, rouge-score
        raise DependencyError(f"evaluation needs {exc.name}", hint="pip install 'gpt-finetune[eval]'") from None
    from tqdm import tqdm

    s = settings_from(ns)
    if ns.eval_batch is None:
        ns.eval_batch = default_batch()
    ex = ev.read_examples(ns.data, labels_file=ns.labels, task=ns.eval_task)
    if ns.eval_limit:
        ex.prompts, ex.references = ex.prompts[: ns.eval_limit], ex.references[: ns.eval_limit]
    if ex.task_from == "answers" and not ns.json:
        info("Scoring as classification: the answers are labels (--task answering scores them as free text)")
    backend = get_backend(s, announce=not ns.json)
    recorded = None
    train_path = ns.train
    if ns.eval_job:  # the job's training file and its recorded label sets, where the backend has them
        recorded = backend.job_label_sets(ns.eval_job)
        found = backend.job_training_data(ns.eval_job)
        train_path = train_path or (str(found) if found else None)
    train = ev.read_examples(train_path, task=ex.task, labels_file=ns.labels) if train_path else None
    results: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[Any]] = {}
    if ex.task == "classification":
        refs = ex.reference_labels()
        mode = ns.mode or ("both" if backend.traits.guided_choice else "free")
        kinds = {"both": ["free", "constrained"], "all": ["free", "constrained", "labels"]}.get(mode, [mode])
        choices = None
        if "constrained" in kinds:
            choices = list(recorded.label_sets) if recorded and not ns.train else ev.candidates(ex, train)
        if choices and not ns.json:
            info(
                f"Constrained to {len(choices)} label sets: {', '.join(choices[:8])}{' ...' if len(choices) > 8 else ''}"
            )
        for model in ns.models:
            for kind in kinds:
                name = f"{model} ({kind})" if len(kinds) > 1 else model
                confidences: list[float | None] = []
                with tqdm(total=len(ex.prompts), desc=name[:40], file=sys.stderr, disable=ns.json) as bar:
                    answers = ev.predict(
                        backend,
                        model,
                        ex,
                        choices=choices if kind == "constrained" else None,
                        label_choice=(ex.labels, ex.label_format) if kind == "labels" else None,
                        max_tokens=ns.eval_max_tokens,
                        progress=bar,
                        batch_size=ns.eval_batch,
                        confidences=confidences if kind == "constrained" else None,
                    )
                predictions[name] = ev.as_labels(answers)
                results[name] = classification_metrics(refs, predictions[name], ex.labels)
                if confidences and all(c is not None for c in confidences):
                    correct = [p is not None and set(p) == set(r) for r, p in zip(refs, predictions[name], strict=True)]
                    results[name]["calibration"] = calibration(correct, [c for c in confidences if c is not None])
        names = list(results)
        for name in names[1:]:  # how each differs from the first model (e.g. fine-tuned vs base)
            results[name]["vs_first"] = [
                names[0],
                *bootstrap_macro_f1_difference(refs, predictions[name], predictions[names[0]], ex.labels),
            ]
        if ns.baseline != "none":
            if train is None:
                raise ConfigError("the baseline needs training data", hint="give --train FILE, or --baseline none")
            from ..eval.baseline import BASELINES

            models = list(results)
            fitted = []
            for key in ["tfidf", "svm"] if ns.baseline == "both" else [ns.baseline]:
                base = BASELINES[key]().fit(train.prompt_texts(), train.reference_labels(), ex.labels)
                predictions[base.name] = list(base.predict(ex.prompt_texts()))
                results[base.name] = classification_metrics(refs, predictions[base.name], ex.labels)
                fitted.append(base.name)
            # the comparison that counts is with the best cheap alternative on this data
            best = max(fitted, key=lambda n: results[n]["macro_f1"])
            for name in models:
                results[name]["vs_baseline"] = bootstrap_macro_f1_difference(
                    refs, predictions[name], predictions[best], ex.labels
                )
                if len(fitted) > 1:
                    results[name]["baseline"] = best
    else:
        for model in ns.models:
            with tqdm(total=len(ex.prompts), desc=model[:40], file=sys.stderr, disable=ns.json) as bar:
                answers = ev.predict(
                    backend, model, ex, max_tokens=ns.eval_max_tokens, progress=bar, batch_size=ns.eval_batch
                )
            results[model] = answering_metrics(ex.references, answers)
    curves = None
    if ns.eval_job:
        events = backend.list_events(ns.eval_job, limit=10_000)
        curves = [e.data for e in reversed(events) if e.type == "metrics" and isinstance(e.data, dict)]
    if ns.json:
        print(json.dumps({"data": ns.data, "task": ex.task, "results": results}, indent=1))
    else:
        from ..eval.report import per_label_table, table

        print(table(results, ex.task))
        if ex.task == "classification":
            print("\n" + per_label_table(results))
    if ns.report:
        from ..eval.report import write_report

        path = write_report(ns.report, results, ex.task, data=ns.data, curves=curves)
        if not ns.json:
            info(f"Wrote {path}")
    return 0
