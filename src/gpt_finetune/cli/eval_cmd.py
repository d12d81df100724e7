"""``eval``: models side by side on held-out data, against a TF-IDF baseline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..contract import LabelChoice
from ..data.labels import apply_thresholds, tune_thresholds
from ..errors import ConfigError, DependencyError
from .common import add_config_flag, add_connection_flags, add_dtype_flag, get_backend, info, settings_from, typed


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
        help="held-out chat JSONL (the last assistant message is the reference), or preference pairs "
        "(method dpo's format): how often each model prefers the chosen answer",
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
        choices=["tfidf", "svm", "setfit", "both", "none"],
        default="tfidf",
        help="cheap baseline for classification: TF-IDF + logistic regression (default), word and character "
        "n-grams + linear SVM, SetFit on a sentence encoder (--encoder), or both of the first two (and SetFit "
        "when --encoder is given): each model is then compared with the best of them on this data",
    )
    p.add_argument(
        "--encoder",
        metavar="DIR",
        help="the sentence encoder SetFit fine-tunes (a sentence-transformers directory, or a hub name it "
        "downloads), e.g. all-MiniLM-L6-v2; needs the [setfit] extra",
    )
    p.add_argument(
        "--setfit-pairs",
        dest="setfit_pairs",
        type=typed("limit", "--setfit-pairs"),
        default=20,
        metavar="N",
        help="SetFit's pairs per training example (its num_iterations; default 20, SetFit's own): its time "
        "grows with it, 600 steps for 240 examples at 20",
    )
    p.add_argument(
        "--tune-on",
        dest="tune_on",
        metavar="FILE",
        help="validation chat JSONL (never the --data file) on which per-label thresholds of label-by-label "
        "answers are tuned; adds the answers with those thresholds (implies label by label) and writes "
        "thresholds.json beside the report, for infer --thresholds",
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
    add_dtype_flag(p)
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


def _tune(backend: Any, model: str, tune: Any, by_label: LabelChoice, quiet: bool) -> dict[str, float]:
    """Per-label thresholds for ``model``'s label-by-label answers, tuned on the validation examples."""
    from tqdm import tqdm

    from ..eval import evaluate as ev

    probs: list[dict[str, float]] = []
    with tqdm(total=len(tune.prompts), desc=f"tuning {model}"[:40], file=sys.stderr, disable=quiet) as bar:
        ev.predict(backend, model, tune, label_choice=by_label, label_probs=probs, progress=bar)
    return tune_thresholds(tune.reference_labels(), probs, list(by_label.labels))


def cmd_eval(ns: argparse.Namespace) -> int:
    try:
        from ..eval import evaluate as ev
        from ..eval.metrics import (
            answering_metrics,
            bootstrap_macro_f1_difference,
            calibration,
            classification_metrics,
            unseen_combinations,
        )
    except ImportError as exc:  # scikit-learn, rouge-score
        raise DependencyError(f"evaluation needs {exc.name}", hint="pip install 'gpt-finetune[eval]'") from None
    from tqdm import tqdm

    s = settings_from(ns)
    from ..eval import preference

    if preference.is_preference_file(ns.data):
        return _eval_preferences(ns, get_backend(s, announce=not ns.json))
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
        tune = None
        if ns.tune_on:
            if Path(ns.tune_on).resolve() == Path(ns.data).resolve():
                raise ConfigError(
                    "--tune-on is the --data file: thresholds tuned on the scored data would flatter them",
                    hint="tune on a validation file (prepare --split writes one)",
                )
            tune = ev.read_examples(ns.tune_on, task="classification", labels_file=ns.labels)
            if "labels" not in kinds:
                kinds.append("labels")
        by_label = LabelChoice(tuple(ex.labels), ex.label_format)
        for model in ns.models:
            for kind in kinds:
                name = f"{model} ({kind})" if len(kinds) > 1 else model
                confidences: list[float | None] = []
                label_probs: list[dict[str, float]] = []
                with tqdm(total=len(ex.prompts), desc=name[:40], file=sys.stderr, disable=ns.json) as bar:
                    answers = ev.predict(
                        backend,
                        model,
                        ex,
                        choices=choices if kind == "constrained" else None,
                        label_choice=by_label if kind == "labels" else None,
                        max_tokens=ns.eval_max_tokens,
                        progress=bar,
                        batch_size=ns.eval_batch,
                        confidences=confidences if kind != "free" else None,
                        label_probs=label_probs if kind == "labels" and tune else None,
                    )
                predictions[name] = ev.as_labels(answers)
                results[name] = classification_metrics(refs, predictions[name], ex.labels)
                if confidences and all(c is not None for c in confidences):
                    correct = [p is not None and set(p) == set(r) for r, p in zip(refs, predictions[name], strict=True)]
                    results[name]["calibration"] = calibration(correct, [c for c in confidences if c is not None])
                if kind == "labels" and tune is not None:
                    tuned = f"{model} (labels, tuned thresholds)"
                    thresholds = _tune(backend, model, tune, by_label, ns.json)
                    # the same answers' label probabilities, cut at the thresholds: exactly what the
                    # engine answers for a request with these thresholds
                    predictions[tuned] = [apply_thresholds(p, ex.labels, thresholds) for p in label_probs]
                    results[tuned] = classification_metrics(refs, predictions[tuned], ex.labels)
                    results[tuned]["thresholds"] = thresholds
                    results[tuned]["tuned_on"] = ns.tune_on
        names = list(results)
        for name in names[1:]:  # how each differs from the first model (e.g. fine-tuned vs base)
            results[name]["vs_first"] = [
                names[0],
                *bootstrap_macro_f1_difference(refs, predictions[name], predictions[names[0]], ex.labels),
            ]
        if ns.baseline != "none":
            if train is None:
                raise ConfigError("the baseline needs training data", hint="give --train FILE, or --baseline none")
            from ..eval.baseline import BASELINES, SetfitBaseline

            keys = ["tfidf", "svm", *(["setfit"] if ns.encoder else [])] if ns.baseline == "both" else [ns.baseline]
            if "setfit" in keys and not ns.encoder:
                raise ConfigError(
                    "--baseline setfit needs --encoder: the sentence encoder it fine-tunes",
                    hint="e.g. --encoder all-MiniLM-L6-v2 (downloaded once) or a local sentence-transformers directory",
                )
            models = list(results)
            fitted = []
            for key in keys:
                try:
                    maker = (
                        (lambda: SetfitBaseline(ns.encoder, iterations=ns.setfit_pairs))
                        if key == "setfit"
                        else BASELINES[key]
                    )
                    base = maker().fit(train.prompt_texts(), train.reference_labels(), ex.labels)
                except ImportError as exc:
                    raise DependencyError(
                        f"the {key} baseline needs {exc.name}", hint="pip install 'gpt-finetune[setfit]'"
                    ) from None
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
        if train is not None and any(len(r) > 1 for r in refs):
            seen = {frozenset(x) for x in train.reference_labels()}
            for name in results:
                results[name]["unseen_sets"] = unseen_combinations(refs, predictions[name], seen)
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
        # each example's answer too (labels, or None where it could not be read as labels), so
        # that a caller can compute its own statistics
        listed = predictions if ex.task == "classification" else {}
        print(json.dumps({"data": ns.data, "task": ex.task, "results": results, "predictions": listed}, indent=1))
    else:
        from ..eval.report import per_label_table, table

        print(table(results, ex.task))
        if ex.task == "classification":
            print("\n" + per_label_table(results))
    tuned_results: list[tuple[str, dict[str, Any]]] = [(n, res) for n, res in results.items() if "thresholds" in res]
    for tuned_name, res in tuned_results if not ns.json else []:
        cuts = ", ".join(f"{label} {cut:.2f}" for label, cut in res["thresholds"].items())
        info(f"Thresholds for {tuned_name}, tuned on {ns.tune_on}: {cuts}")
    if ns.report:
        from ..eval.report import write_report

        path = write_report(ns.report, results, ex.task, data=ns.data, curves=curves)
        for k, (tuned_name, res) in enumerate(tuned_results, 1):
            where = Path(ns.report) / ("thresholds.json" if len(tuned_results) == 1 else f"thresholds-{k}.json")
            body = {"model": tuned_name.rsplit(" (", 1)[0], "tuned_on": ns.tune_on, "thresholds": res["thresholds"]}
            write_text_atomic(where, json.dumps(body, indent=1) + "\n")
            if not ns.json:
                info(f"Wrote {where} (infer --each-label --thresholds {where})")
        if not ns.json:
            info(f"Wrote {path}")
    return 0


def _eval_preferences(ns: argparse.Namespace, backend: Any) -> int:
    """A preference file: each model's preference for the chosen answers, the first model
    (the base, usually) compared with the others pair by pair."""
    from tqdm import tqdm

    from ..eval import preference

    pairs = preference.read_pairs(ns.data)
    if ns.eval_limit:
        pairs = pairs[: ns.eval_limit]
    results: dict[str, dict[str, Any]] = {}
    first: list[float] | None = None
    for model in ns.models:
        with tqdm(total=len(pairs), desc=model[:40], file=sys.stderr, disable=ns.json) as bar:
            m = preference.margins(backend, model, pairs, progress=bar)
        results[model] = preference.summary(m, first)
        first = m if first is None else first
    text = preference.table(results)
    if ns.json:
        print(json.dumps({"data": ns.data, "task": "preference", "results": results}, indent=1))
    else:
        print(text)
    if ns.report:
        Path(ns.report).mkdir(parents=True, exist_ok=True)  # as write_report does
        where = Path(ns.report) / "report.md"
        body = f"# Preference evaluation\n\nData: `{ns.data}` ({len(pairs)} pairs)\n\n{text}\n"
        write_text_atomic(where, body)
        if not ns.json:
            info(f"Wrote {where}")
    return 0
