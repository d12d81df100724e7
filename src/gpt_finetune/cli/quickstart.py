"""``quickstart``: the README's main command. Prepare the bundled example data, fine-tune the
default model on this machine with LoRA, and compare the base and fine-tuned models' answers on
held-out examples. Always the local backend, whatever keys the environment holds."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..contract import JobStatus
from ..data.convert import ConvertOptions
from ..data.prepare import prepare
from ..settings import load_settings
from .common import info, plot_job, typed
from .watch import watch_job

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # package data: works from a wheel too


def add_quickstart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(EXAMPLES / "issues.json"), help="raw data (default: the example issues)")
    p.add_argument("--data-config", default=str(EXAMPLES / "data_process.cfg"), help="data_process.cfg to use")
    p.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help="base model (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--n-epochs",
        type=typed("n_epochs"),
        default=3,
        help="default: 3, which keeps it under 10 minutes on 2 CPU cores (a classification job's own default "
        "is 5: `auto`)",
    )
    p.add_argument("--holdout", type=float, default=0.1, help="fraction held out for the comparison")
    p.add_argument("--show", type=typed("limit", "--show"), default=6, help="held-out examples to print side by side")
    p.add_argument("--workdir", default="quickstart", help="where prepared data and the loss plot go")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(ns: argparse.Namespace) -> int:
    from ..backends.base import Hyperparameters
    from ..backends.local import LocalBackend

    t0 = time.time()
    settings = load_settings({"backend": "local", "home": ns.home})
    work = Path(ns.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_settings({}, config_file=ns.data_config, env={}, default_config=work / "none.cfg")
    out = work / "issues.jsonl"
    shown = "the bundled examples/issues.json" if Path(ns.data) == EXAMPLES / "issues.json" else ns.data
    info(f"1/4 Preparing {shown} -> {out} (holding out {ns.holdout:.0%} for the comparison)")
    prepared = prepare(
        ns.data,
        out,
        options=ConvertOptions(sys_prompt=cfg.sys_prompt, task_type=cfg.task_type or "classification"),
        split=ns.holdout,
        seed=0,
    )
    info(
        f"    {prepared.n_train} training and {prepared.n_valid} held-out examples, {len(prepared.label_counts)} labels"
    )

    backend = LocalBackend.from_settings(settings)
    info(f"2/4 Fine-tuning {ns.model} with LoRA on this machine ({backend.describe()})")
    train_id = backend.upload_file(out).id
    valid_id = backend.upload_file(Path(prepared.validation_output or "")).id
    job = backend.create_job(
        model=ns.model,
        training_file=train_id,
        validation_file=valid_id,
        hyperparameters=Hyperparameters(n_epochs=ns.n_epochs),
        suffix="quickstart",
        seed=0,
    )
    info(f"    job {job.id}")
    job = watch_job(backend, job.id, poll=1.0)
    if job.status != JobStatus.SUCCEEDED:
        return 1
    info(f"    loss curve: {plot_job(backend, job.id, work / 'loss.png', title=str(job.fine_tuned_model))}")

    info(f"3/4 Asking the base and the fine-tuned model about {prepared.n_valid} held-out issues")
    from ..eval import evaluate as ev
    from ..eval.metrics import classification_metrics

    held_out = ev.read_examples(prepared.validation_output or "", task="classification")
    answers = {
        name: ev.predict(backend, model, held_out, max_tokens=24)
        for name, model in (("base", ns.model), ("tuned", job.fine_tuned_model))
    }
    scores = {
        name: classification_metrics(held_out.reference_labels(), ev.as_labels(a), held_out.labels)
        for name, a in answers.items()
    }
    # the cheap alternative on the same split: what the fine-tune has to beat to be worth it
    from ..eval.baseline import TfidfBaseline

    train_ex = ev.read_examples(str(out), task="classification")
    tfidf = TfidfBaseline().fit(train_ex.prompt_texts(), train_ex.reference_labels(), held_out.labels)
    scores["tfidf"] = classification_metrics(
        held_out.reference_labels(), list[list[str] | None](tfidf.predict(held_out.prompt_texts())), held_out.labels
    )
    results = [
        (p[-1]["content"].split(" body:")[0].removeprefix("title: "), truth, base, tuned)
        for p, truth, base, tuned in zip(
            held_out.prompts, held_out.references, answers["base"], answers["tuned"], strict=True
        )
    ]
    info("4/4 Results")
    print(_table(results[: ns.show]))
    n = len(results)
    exact = {name: round(m["accuracy"] * n) for name, m in scores.items()}
    print(f"\nExact label-set match on {n} held-out issues: base {exact['base']}/{n}, fine-tuned {exact['tuned']}/{n}")
    print(
        f"Macro-F1: base {scores['base']['macro_f1']:.3f}, fine-tuned {scores['tuned']['macro_f1']:.3f}, "
        f"TF-IDF + logistic regression {scores['tfidf']['macro_f1']:.3f} (trained on the same {prepared.n_train} issues)"
    )
    print(
        f"Compare more models, with intervals: gpt-finetune eval -m {job.fine_tuned_model} -d {prepared.validation_output} --train {out} --baseline both"
    )
    print(f"Fine-tuned model: {job.fine_tuned_model}")
    print(f'Ask it yourself:  gpt-finetune infer --model "{job.fine_tuned_model}" -q "title: ... body: ..."')
    print(f"Done in {time.time() - t0:.0f} s")
    return 0


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    def cut(text: str, n: int) -> str:
        text = " ".join(text.split())
        return text if len(text) <= n else text[: n - 1] + "…"

    head = ("issue title", "true labels", "base model", "fine-tuned")
    widths = (44, 26, 26, 26)
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(cut(v, w).ljust(w) for v, w in zip(r, widths)))
    return "\n".join(lines)
