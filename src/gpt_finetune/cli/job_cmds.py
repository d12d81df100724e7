"""``finetune`` (the seed's finetune.py), and ``files``, ``jobs`` and ``models``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..contract import SUFFIX_MAX, JobStatus
from ..data.analysis import analyze_file
from ..errors import BackendError, ConfigError, DataError
from ..local.export import FORMATS as EXPORT_FORMATS
from ..local.export import GGUF_DTYPES
from .common import (
    add_config_flag,
    add_connection_flags,
    add_hyperparameter_flags,
    add_local_option_flags,
    get_backend,
    info,
    plot_job,
    require,
    settings_from,
    typed,
)
from .data_cmds import format_finding
from .watch import watch_job


def add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--data", dest="training_file", metavar="FILE", help="training data (chat JSONL)")
    add_config_flag(p)
    add_connection_flags(p)
    p.add_argument("-m", "--model", dest="model", help="base model (default gpt-3.5-turbo)")
    p.add_argument(
        "-v", "--validation-file", dest="validation_file", metavar="FILE", help="validation data (chat JSONL)"
    )
    add_hyperparameter_flags(p)
    p.add_argument(
        "--suffix", dest="suffix", help=f"up to {SUFFIX_MAX} characters added to the fine-tuned model's name"
    )
    p.add_argument("--seed", dest="seed", type=typed("seed"), help="training seed")
    p.add_argument(
        "--no-validate",
        dest="validate_first",
        action="store_const",
        const=False,
        help="skip the local check of the data before uploading",
    )
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    add_local_option_flags(p)
    p.set_defaults(func=cmd_finetune)


def _check_local(path: str, model: str, method: str = "supervised") -> None:
    report = analyze_file(path, model, count_tokens=False)
    want = "preference" if method == "dpo" else "chat"
    if not report.n_errors and report.n_examples and report.kind != want:
        raise DataError(
            f"holds {'preference pairs' if report.kind == 'preference' else 'chat examples'}, but the job's method "
            f"is {method}",
            path=path,
            line=1,
            hint="preference pairs train with --method dpo (method = dpo in the config), chat examples without it",
        )
    if report.n_errors:
        for f in report.errors[:10]:
            info(format_finding(f))
        first = report.errors[0]
        raise DataError(
            f"{report.n_errors} errors in the training data; the first: {first.message}",
            path=path,
            line=first.line,
            field=first.field,
            hint=f"see all with: gpt-finetune validate {path} (or skip this check with --no-validate)",
        )


def _method(s: Any) -> tuple[str, Any]:
    """The job's method and its hyperparameters from the settings (``method``, ``beta``, ...)."""
    from ..contract import HYPERPARAMETERS

    method = s.method or "supervised"
    if s.beta is not None and method != "dpo":
        raise ConfigError(
            f"beta is a hyperparameter of method dpo, not {method} (set in {s.origin('beta')})",
            hint="add --method dpo (or method = dpo in the config), or drop beta",
        )
    values = {
        "n_epochs": s.n_epochs,
        "batch_size": s.batch_size,
        "learning_rate_multiplier": s.learning_rate_multiplier,
    }
    if method == "dpo":
        values["beta"] = s.beta
    return method, HYPERPARAMETERS[method].from_values(values)


def cmd_finetune(ns: argparse.Namespace) -> int:
    s = settings_from(ns)
    training = require(s.training_file, "training file", "pass -d/--data FILE or set training_file in the config")
    model = s.model or "gpt-3.5-turbo"
    files = [("training", training)] + ([("validation", s.validation_file)] if s.validation_file else [])
    method, hyperparameters = _method(s)
    for _, path in files:
        if not Path(path).is_file():
            raise DataError("file does not exist", path=path)
        if s.validate_first is not False:
            _check_local(path, model, method)
    backend = get_backend(s)
    backend.check_job(model=model, suffix=s.suffix, seed=s.seed)  # before anything is uploaded
    ids = {}
    for kind, path in files:
        uploaded = backend.upload_file(Path(path))
        info(f"Uploaded {kind} file {path} as {uploaded.id}")
        ids[kind] = uploaded.id
    job = backend.create_job(
        model=model,
        training_file=ids["training"],
        validation_file=ids.get("validation"),
        hyperparameters=hyperparameters,
        suffix=s.suffix,
        seed=s.seed,
        method=method,
    )
    info(f"Created fine-tuning job {job.id} ({job.model}, status {job.status})")
    print(job.id)
    if ns.wait:
        return _exit_for(watch_job(backend, job.id))
    info(f"Follow it with: gpt-finetune jobs wait {job.id}")
    return 0


def _exit_for(job: Any) -> int:
    return 0 if job.status == JobStatus.SUCCEEDED else 1


def add_files(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="files_cmd", required=True, metavar="{upload,list,get,delete}")
    up = sub.add_parser("upload", help="upload a training or validation file")
    up.add_argument("file")
    up.add_argument("--purpose", default="fine-tune")
    for name in ("list", "get", "delete"):
        q = sub.add_parser(name, help=f"{name} uploaded files")
        if name != "list":
            q.add_argument("file_id")
    for q in sub.choices.values():
        add_config_flag(q)
        add_connection_flags(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_files)


def cmd_files(ns: argparse.Namespace) -> int:
    backend = get_backend(settings_from(ns), announce=False)
    if ns.files_cmd == "upload":
        _show(backend.upload_file(Path(ns.file), ns.purpose), ns.json, "id bytes filename purpose")
    elif ns.files_cmd == "list":
        _show_list(backend.list_files(), ns.json, "id bytes filename purpose created_at")
    elif ns.files_cmd == "get":
        _show(backend.retrieve_file(ns.file_id), ns.json, "id bytes filename purpose created_at")
    else:
        backend.delete_file(ns.file_id)
        info(f"Deleted {ns.file_id}")
    return 0


def add_jobs(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(
        dest="jobs_cmd", required=True, metavar="{create,list,get,events,checkpoints,cancel,pause,resume,wait,plot}"
    )
    add_finetune(sub.add_parser("create", help="upload data and create a job (same as finetune)"))
    lst = sub.add_parser("list", help="list jobs, newest first")
    lst.add_argument("--limit", type=typed("limit"), default=20)
    lst.add_argument("--after", help="job id to page after")
    for name, text in (
        ("get", "show a job"),
        ("events", "a job's events, oldest first"),
        ("checkpoints", "a job's checkpoints"),
        ("cancel", "cancel a job"),
        ("pause", "pause a job: it saves a checkpoint and frees the trainer"),
        ("resume", "resume a paused job from its checkpoint"),
        ("wait", "follow a job with a progress bar until it ends"),
        ("plot", "draw a job's loss and accuracy curves as a PNG"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("job_id")
        if name == "plot":
            q.add_argument("-o", "--output", default=None, help="PNG to write (default: <job id>.png)")
    for name, q in sub.choices.items():
        if name == "create":
            continue
        add_config_flag(q)
        add_connection_flags(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_jobs)


def cmd_jobs(ns: argparse.Namespace) -> int:
    if ns.jobs_cmd == "create":
        return cmd_finetune(ns)
    backend = get_backend(settings_from(ns), announce=False)
    cols = "id status model fine_tuned_model created_at"
    if ns.jobs_cmd == "list":
        _show_list(backend.list_jobs(limit=ns.limit, after=ns.after), ns.json, cols)
    elif ns.jobs_cmd == "get":
        job = backend.retrieve_job(ns.job_id)
        _show(job, ns.json, cols + " trained_tokens training_file validation_file result_files")
        if job.error and job.error.message and not ns.json:
            print(f"error: {job.error.code}: {job.error.message}")
    elif ns.jobs_cmd == "events":
        events = list(reversed(backend.list_events(ns.job_id, limit=1000)))
        if ns.json:
            print(json.dumps([e.model_dump(mode="json") for e in events], indent=1))
        for e in events if not ns.json else []:
            print(f"{_ts(e.created_at)}  {e.level:<5} {e.message}")
    elif ns.jobs_cmd == "checkpoints":
        _show_list(backend.list_checkpoints(ns.job_id), ns.json, "id step_number fine_tuned_model_checkpoint")
    elif ns.jobs_cmd in ("cancel", "pause", "resume"):
        job = getattr(backend, f"{ns.jobs_cmd}_job")(ns.job_id)
        info(f"Job {job.id}: {job.status}")
    elif ns.jobs_cmd == "wait":
        return _exit_for(watch_job(backend, ns.job_id))
    elif ns.jobs_cmd == "plot":
        info(f"Wrote {plot_job(backend, ns.job_id, ns.output or f'{ns.job_id}.png', title=ns.job_id)}")
    return 0


def add_models(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_cmd", required=True, metavar="{list,get,delete,alias,unalias,export}")
    sub.add_parser("list", help="base and fine-tuned models, checkpoints and aliases")
    sub.add_parser("get", help="show a model").add_argument("model_id")
    sub.add_parser("delete", help="delete a fine-tuned model (or only an alias)").add_argument("model_id")
    alias = sub.add_parser("alias", help="let another name (an OpenAI model id) answer as a model")
    alias.add_argument("alias", help="the new name, e.g. ft:gpt-4o-mini-2024-07-18:acme::AbC123")
    alias.add_argument("model_id", help="the model it names")
    alias.add_argument("--force", action="store_true", help="replace an alias that names another model")
    sub.add_parser("unalias", help="remove an alias (the model stays)").add_argument("alias")
    exp = sub.add_parser(
        "export",
        help="write a model for other runtimes: merged Hugging Face model, GGUF + Ollama Modelfile, or the adapter",
    )
    exp.add_argument("model_id", help="a fine-tuned model, a checkpoint, an alias or a base model")
    exp.add_argument("-o", "--output", required=True, help="the directory to create")
    exp.add_argument(
        "--format",
        dest="export_format",
        choices=EXPORT_FORMATS,
        default="gguf",
        help="hf: merged safetensors model; gguf: one GGUF file and a Modelfile (default); "
        "adapter: the LoRA as PEFT wrote it and as a llama.cpp LoRA GGUF",
    )
    exp.add_argument(
        "--dtype",
        choices=GGUF_DTYPES,  # the widest set; check_request refuses a pair that does not go together
        help="tensor type (default: q8_0 for gguf, f32 for hf and adapter; q8_0 is for gguf only)",
    )
    exp.add_argument(
        "--force", action="store_true", help="replace an existing output (only once the export is complete)"
    )
    exp.add_argument(
        "--eval",
        dest="eval_results",
        metavar="FILE",
        help="what gpt-finetune eval --json printed for this model: its figures go in the model card",
    )
    for q in sub.choices.values():
        add_config_flag(q)
        add_connection_flags(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)


def cmd_models(ns: argparse.Namespace) -> int:
    backend = get_backend(settings_from(ns), announce=False)
    if ns.models_cmd == "list":
        _show_list(backend.list_models(), ns.json, "id owned_by parent created")
    elif ns.models_cmd == "get":
        _show(backend.retrieve_model(ns.model_id), ns.json, "id owned_by parent root created")
    elif ns.models_cmd == "alias":
        _show(backend.add_alias(ns.alias, ns.model_id, replace=ns.force), ns.json, "id parent root created")
    elif ns.models_cmd == "unalias":
        backend.remove_alias(ns.alias)
        info(f"Removed the alias {ns.alias}")
    elif ns.models_cmd == "export":
        return _export(backend, ns)
    else:
        if not backend.delete_model(ns.model_id):
            raise BackendError(f"model {ns.model_id} was not deleted")
        info(f"Deleted {ns.model_id}")
    return 0


def _export(backend: Any, ns: argparse.Namespace) -> int:
    """Exports read the model's files, so they run where the data directory is: OpenAI lets no one
    download a fine-tune's weights, and a gpt-finetune server serves no weights (a file of
    hundreds of MB per request, and a client would learn more than the API shows); run the
    command on the server's machine with its data directory (--home) instead."""
    if not hasattr(backend, "export_model"):
        raise BackendError(
            f"{ns.model_id} cannot be exported through {backend.describe()}: exports read the model's files",
            hint="on OpenAI, move the model here first (gpt-finetune migrate); for a gpt-finetune server, run "
            "this command on its machine with --backend local --home <its data directory>",
        )
    started = time.monotonic()
    evaluation = None
    if ns.eval_results:
        from ..eval.report import read_eval_json

        evaluation = read_eval_json(Path(ns.eval_results))
    result = backend.export_model(
        ns.model_id,
        Path(ns.output),
        ns.export_format,
        ns.dtype,
        force=ns.force,
        progress=lambda m: info(f"  {m}"),
        evaluation=evaluation,
    )
    if ns.json:
        print(json.dumps({"path": str(result.path), "files": result.files, "run": result.run}, indent=1))
        return 0
    info(f"Exported {ns.model_id} as {ns.export_format} in {time.monotonic() - started:.0f} s: {result.path}")
    for name in result.files:
        size = (result.path / name).stat().st_size
        print(f"  {name:<60} {size / 1e6:9.1f} MB")
    info("Run it:")
    for line in result.run:
        info(f"  {line}")
    return 0


def _ts(epoch: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def _row(obj: Any, cols: list[str]) -> list[str]:
    out = []
    for c in cols:
        v = getattr(obj, c, None)
        if c in ("created_at", "created") and isinstance(v, int):
            v = _ts(v)
        out.append("-" if v is None else str(v))
    return out


def _show(obj: Any, as_json: bool, cols: str) -> None:
    if as_json:
        print(json.dumps(obj.model_dump(mode="json"), indent=1))
        return
    for c, v in zip(cols.split(), _row(obj, cols.split())):
        print(f"{c:<18} {v}")


def _show_list(items: list[Any], as_json: bool, cols: str) -> None:
    if as_json:
        print(json.dumps([i.model_dump(mode="json") for i in items], indent=1))
        return
    names = cols.split()
    rows = [names] + [_row(i, names) for i in items]
    widths = [max(len(r[k]) for r in rows) for k in range(len(names))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
