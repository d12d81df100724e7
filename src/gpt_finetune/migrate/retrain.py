"""``migrate retrain``: one local job per succeeded OpenAI job, and the old id as an alias.

Each local job keeps OpenAI's epochs, batch size, learning-rate multiplier, seed and suffix.
OpenAI's multiplier scales OpenAI's own base learning rate, which it does not publish; here it
scales the local engine's base rate for the training type (``contract.BASE_LEARNING_RATE``:
1e-3 for LoRA, 5e-5 for full training), so ``2.0`` still means "twice the default".

A local job carries the OpenAI job it replaces in its metadata (``migrated_from``): that is how a
rerun finds it, so no OpenAI job is ever trained twice, whatever was killed when.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..contract import METHODS, UNSUCCESSFUL, JobStatus, LocalOptions
from ..data.analysis import MIN_EXAMPLES
from ..data.checks import first_example_kind
from ..errors import BackendError
from . import manifest as mf
from .record import prompts_path, recordings

ALIAS_NOTE = "migrated from OpenAI job "


@dataclass
class Retrained:
    key: str
    state: str  # created, exists, succeeded, failed, waiting, unsupported, no_data
    message: str
    local_job: str | None = None
    local_model: str | None = None


def local_jobs(services: Any, openai_job_id: str) -> list[dict[str, Any]]:
    """The local jobs made for an OpenAI job, newest first."""
    return services.jobs.list_jobs(limit=100, metadata={"migrated_from": openai_job_id})[0]


def _hyperparameters(job: mf.Job, method: str = "supervised") -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = ("n_epochs", "batch_size", "learning_rate_multiplier") + (("beta",) if method == "dpo" else ())
    for key in keys:
        value = job.hyperparameters.get(key)
        if value is not None and value != "auto":
            out[key] = value
    return out


def distillation_file(root: Path, model: mf.Model) -> tuple[Path | None, int]:
    """The recorded prompts with the old model's answers as a chat training file (or None)."""
    rows = prompts_path(root, model.key)
    answers = recordings(root, model.key)
    if not rows.is_file() or not answers:
        return None, 0
    lines = []
    for line in rows.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        prompt = json.loads(line)
        answer = answers.get(prompt["custom_id"])
        if answer is not None and answer["answer"].strip():
            lines.append({"messages": [*prompt["messages"], {"role": "assistant", "content": answer["answer"]}]})
    path = root / "distill" / f"{model.key}.jsonl"
    path.parent.mkdir(exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return path, len(lines)


def retrain_one(
    services: Any,
    root: Path,
    manifest: mf.Manifest,
    model: mf.Model,
    *,
    base_model: str,
    options: LocalOptions,
    from_recordings: bool = False,
    retry_failed: bool = False,
) -> Retrained:
    job = manifest.job(model.job)
    if job is None and not from_recordings:  # a model the organisation can call, made by a job it cannot see
        return Retrained(
            model.key,
            "no_data",
            "no OpenAI job is visible for this model, so neither its data nor its hyperparameters are known: "
            "train it on its recorded answers with --from-recordings",
        )
    if job is not None and job.method not in METHODS:
        return Retrained(model.key, "unsupported", f"method {job.method!r} cannot be trained here")
    found = local_jobs(services, job.id if job else model.key)
    live = [j for j in found if j["status"] not in UNSUCCESSFUL]
    if live:
        j = live[0]
        return Retrained(model.key, "exists", f"local job {j['id']} is {j['status']}", j["id"], j["fine_tuned_model"])
    if found and not retry_failed:
        j = found[0]
        why = (j.get("error") or {}).get("message") or j["status"]
        return Retrained(
            model.key, "failed", f"local job {j['id']} {j['status']} ({why}); --retry-failed trains it again", j["id"]
        )
    return _create(services, root, manifest, model, job, base_model, options, from_recordings)


def _create(
    services: Any,
    root: Path,
    manifest: mf.Manifest,
    model: mf.Model,
    job: mf.Job | None,
    base_model: str,
    options: LocalOptions,
    from_recordings: bool,
) -> Retrained:
    train = job.training_file if job else None
    valid = job.validation_file if job else None
    training_data = "original"
    if train is not None and train.local:
        train_path: Path = root / train.local
        valid_path = root / valid.local if valid is not None and valid.local else None
    elif from_recordings:
        path, n = distillation_file(root, model)
        if path is None or n < MIN_EXAMPLES:
            return Retrained(
                model.key,
                "no_data",
                f"{n} recorded answers; a job needs at least {MIN_EXAMPLES}: record more (migrate record)",
            )
        train_path, valid_path, training_data = path, None, "recordings"
    else:
        what = f"{train.id} ({train.filename}, {train.bytes} bytes)" if train else "its training file"
        return Retrained(
            model.key,
            "no_data",
            f"the training file {what} was not recovered: give your copy (migrate inventory --data PATH), "
            "or train on the old model's recorded answers (--from-recordings)",
        )
    # a DPO job retrains as DPO on its preference pairs; distilled from recordings (chat answers
    # of the old model) it can only be supervised, and says so
    method = job.method if job and training_data == "original" else "supervised"
    if method == "dpo" and first_example_kind(train_path) == "chat":
        return Retrained(
            model.key,
            "unsupported",
            f"the training file of DPO job {job.id if job else model.key} holds chat examples, not preference pairs "
            "(input, preferred_output, non_preferred_output): give the preference file (migrate inventory --data PATH)",
        )
    training = services.files.create_from_path(train_path)
    validation = services.files.create_from_path(valid_path) if valid_path is not None else None
    metadata = {
        "migrated_from": job.id if job else model.key,
        "openai_model": model.id[:512],
        "training_data": training_data,
        "migration": manifest.migration_id,
    }
    created = services.jobs.create(
        model=base_model,
        training_file=training["id"],
        validation_file=validation["id"] if validation else None,
        hyperparameters=_hyperparameters(job, method) if job else {},
        method=method,
        suffix=job.suffix if job else None,
        seed=job.seed if job else None,
        metadata=metadata,
        options=options,
    )
    source = f"the training file {train.id}" if training_data == "original" and train else ""
    if training_data == "recordings":
        n = sum(1 for line in train_path.read_text(encoding="utf-8").splitlines() if line.strip())
        source = f"{n} answers recorded from {model.id} (distillation from the old model)"
        services.jobs.event(
            created["id"],
            f"Training data: {source}; its own training file was not recovered",
            level="warn",
        )
    services.jobs.event(created["id"], f"Retraining OpenAI job {metadata['migrated_from']} ({model.id}) from {source}")
    return Retrained(model.key, "created", f"local job {created['id']} created", created["id"])


def link(services: Any, manifest: mf.Manifest, model: mf.Model) -> str | None:
    """Let the OpenAI id name the newest succeeded local model that replaces it. Returns the
    local model id, or None while there is none. A later retrain moves a migration's alias;
    an alias the user made by hand is left alone (BackendError)."""
    jobs = [j for j in local_jobs(services, model.job or model.key) if j["status"] == JobStatus.SUCCEEDED]
    if not jobs:
        return None
    target = jobs[0]["fine_tuned_model"]
    existing = [a for a in services.models.aliases() if a["id"] == model.id]
    if existing and existing[0]["model"] != target and not str(existing[0]["note"] or "").startswith(ALIAS_NOTE):
        raise BackendError(
            f"{model.id} is already an alias of {existing[0]['model']}, made by hand",
            hint=f"remove it (gpt-finetune models unalias {model.id}) to let it name the retrained model",
        )
    services.models.add_alias(model.id, target, note=ALIAS_NOTE + (model.job or model.key), replace=True)
    return str(target)
