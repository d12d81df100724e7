"""``migrate inventory``: every job and fine-tuned model of the organisation, and their files.

OpenAI serves the content of result files but has refused that of files uploaded for
fine-tuning; the user's own copies (``--data``) are matched to OpenAI's files by name and size,
and by content where OpenAI's copy was served too. Taking the inventory again refreshes what
OpenAI says and keeps what was found before (downloads, matched copies, the migration id).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import UNFINISHED, JobStatus
from ..errors import BackendError, ConfigError, DataError, NotFoundError
from ..openai_facts import base_of, stops_serving
from ..store import now
from . import manifest as mf

# what a job's status means for the move (OpenAI's job states are the contract's)
SKIPPED = {JobStatus.FAILED: "the job failed", JobStatus.CANCELLED: "the job was cancelled"}


@dataclass
class Inventory:
    manifest: mf.Manifest
    notes: list[str] = field(default_factory=list)  # what could not be had, and what to do


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """A field of an SDK object (or a dict), tolerating fields older API versions lack."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    value = getattr(obj, name, None)
    if value is None:
        extra = getattr(obj, "model_extra", None) or {}
        value = extra.get(name, default)
    return default if value is None else value


def _method(job: Any) -> tuple[str, dict[str, Any]]:
    """(method type, the hyperparameters as OpenAI resolved them)."""
    method = _get(job, "method")
    kind = str(_get(method, "type") or "supervised") if method is not None else "supervised"
    hp: Any = None
    if method is not None:
        hp = _get(_get(method, kind), "hyperparameters")
    hp = hp if hp is not None else _get(job, "hyperparameters")
    if hp is None:
        return kind, {}
    raw = hp.model_dump() if hasattr(hp, "model_dump") else dict(hp)
    return kind, {k: v for k, v in raw.items() if v is not None}


def suffix_of(job: Any, model_id: str | None) -> str | None:
    """The suffix: from the job where OpenAI gives it, else from ``ft:<base>:<org>:<suffix>:<id>``."""
    given = _get(job, "user_provided_suffix") or _get(job, "suffix")
    if given:
        return str(given)
    parts = (model_id or "").split(":")
    return parts[3] or None if len(parts) >= 5 and parts[0] == "ft" else None


def take(
    source: Any,
    directory: str | Path,
    *,
    data: Iterable[str | Path] = (),
    today: dt.date,
    table: dict[str, dt.date] | None = None,
    training_ends: dt.date,
    say: Callable[[str], None] = lambda _m: None,
) -> Inventory:
    """Take (or refresh) the inventory into ``directory``; ``source`` is an ``OpenAIBackend``."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    old = mf.load(root) if mf.manifest_path(root).is_file() else None
    given = _candidates(data)  # a --data path that does not exist is refused before OpenAI is asked
    say("Listing fine-tuning jobs and models")
    jobs = source.list_all_jobs()
    listed = source.list_models()
    fine_tunes = {m.id: m for m in listed if m.id.startswith("ft:") and ":ckpt-step-" not in m.id}
    organization = next((str(j.organization_id) for j in jobs if getattr(j, "organization_id", None)), None)
    if organization is None:
        organization = next((str(m.owned_by) for m in fine_tunes.values() if m.owned_by), None)
    if old is not None and old.organization and organization and old.organization != organization:
        raise ConfigError(
            f"{root} holds the migration of organisation {old.organization}, but this API key belongs to {organization}",
            hint="use another directory (-o) for this organisation, or the key of the one the directory is for",
        )
    root.mkdir(parents=True, exist_ok=True)
    files_dir = root / "files"
    files_dir.mkdir(exist_ok=True)
    before = {ref.id: ref for j in (old.jobs if old else []) for ref in _refs(j)}
    inv = Inventory(
        mf.Manifest(
            migration_id=old.migration_id if old else secrets.token_hex(8),
            organization=organization,
            source=str(getattr(source, "base_url", "")),
            inventoried_at=now(),
            today=today,
            training_ends=training_ends,
        )
    )
    file_cache: dict[str, mf.FileRef] = {}
    for job in jobs:
        kind, hp = _method(job)
        status = str(job.status)
        entry = mf.Job(
            id=job.id,
            status=status,
            base_model=str(job.model),
            fine_tuned_model=job.fine_tuned_model,
            created_at=int(job.created_at),
            finished_at=job.finished_at,
            method=kind,
            hyperparameters=hp,
            seed=job.seed,
            suffix=suffix_of(job, job.fine_tuned_model),
            metadata=dict(job.metadata) if getattr(job, "metadata", None) else None,
            error=(job.error.message or job.error.code) if getattr(job, "error", None) and job.error.message else None,
        )
        skip = status in SKIPPED or status in UNFINISHED
        for name in ("training_file", "validation_file"):
            file_id = getattr(job, name, None)
            if file_id and not skip:
                if file_id not in file_cache:
                    file_cache[file_id] = _file(source, root, file_id, before.get(file_id), ".jsonl", say)
                setattr(entry, name, file_cache[file_id])
            elif file_id:
                setattr(entry, name, mf.FileRef(id=file_id))
        if not skip:
            for file_id in job.result_files or []:
                entry.result_files.append(_file(source, root, file_id, before.get(file_id), ".csv", say))
            if status == JobStatus.SUCCEEDED:
                entry.checkpoints = _checkpoints(source, job.id)
        inv.manifest.jobs.append(entry)
    _match(inv, root, given)
    _models(inv, fine_tunes, table)
    for job in inv.manifest.jobs:
        for name in ("training_file", "validation_file"):
            ref = getattr(job, name)
            if job.status == JobStatus.SUCCEEDED and ref is not None and ref.local is None:
                why = f"OpenAI refused its content ({ref.refused})" if ref.refused else "its content was not served"
                inv.notes.append(
                    f"{job.id}: {name.replace('_', ' ')} {ref.id} ({ref.filename or '?'}, "
                    f"{ref.bytes if ref.bytes is not None else '?'} bytes) is missing: {why}; give your copy "
                    "with --data PATH"
                )
    mf.save(root, inv.manifest)
    return inv


def _refs(job: mf.Job) -> list[mf.FileRef]:
    return [r for r in (job.training_file, job.validation_file, *job.result_files) if r is not None]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file(
    source: Any, root: Path, file_id: str, before: mf.FileRef | None, ext: str, say: Callable[[str], None]
) -> mf.FileRef:
    """OpenAI's description of a file, and its content when it is served (kept from before when
    it is already here)."""
    try:
        meta = source.retrieve_file(file_id)
    except NotFoundError as exc:
        ref = before.model_copy() if before else mf.FileRef(id=file_id)
        ref.refused = ref.refused or f"the file is gone from OpenAI ({exc.message})"
        return ref
    ref = mf.FileRef(id=file_id, filename=meta.filename, bytes=meta.bytes, purpose=meta.purpose)
    if before is not None and before.local and (root / before.local).is_file():
        ref.local, ref.source, ref.matched_from, ref.sha256 = (
            before.local,
            before.source,
            before.matched_from,
            before.sha256,
        )
        return ref
    try:
        content = source.file_content(file_id)
    except BackendError as exc:
        ref.refused = exc.message.split(": ", 1)[-1][:300]
        return ref
    from ..atomic import write_bytes_atomic

    local = Path("files") / f"{_safe_id(file_id)}{ext}"
    write_bytes_atomic(root / local, content)
    say(f"Downloaded {file_id} ({meta.filename}, {len(content):,} bytes)")
    ref.local, ref.source, ref.sha256 = str(local), "downloaded", hashlib.sha256(content).hexdigest()
    return ref


def _safe_id(file_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in file_id)[:100]
    return safe if safe == file_id else f"{safe}-{hashlib.sha256(file_id.encode()).hexdigest()[:8]}"


def _checkpoints(source: Any, job_id: str) -> list[mf.Checkpoint]:
    try:
        found = source.list_checkpoints(job_id)
    except BackendError:
        return []
    out = []
    for c in found:
        metrics = c.metrics.model_dump(exclude_none=True) if getattr(c, "metrics", None) is not None else {}
        out.append(
            mf.Checkpoint(id=c.id, step_number=c.step_number, model=c.fine_tuned_model_checkpoint, metrics=metrics)
        )
    return out


def _candidates(paths: Iterable[str | Path]) -> list[tuple[str, list[Path]]]:
    """(the path as given, the files it stands for)."""
    out = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files = [path]
        else:
            raise DataError("does not exist", path=str(given), hint="--data takes your copies of the training files")
        out.append((str(given), files))
    return out


def _match(inv: Inventory, root: Path, given: list[tuple[str, list[Path]]]) -> None:
    """Copy the user's files into the migration directory where one is OpenAI's missing file:
    same name and size (and the same content where OpenAI's was downloaded too)."""
    if not given:
        return
    wanted: dict[str, mf.FileRef] = {}  # jobs that used one file share its FileRef: a match serves them all
    for job in inv.manifest.jobs:
        for ref in (job.training_file, job.validation_file):
            if ref is not None and ref.filename is not None:
                wanted.setdefault(ref.id, ref)
    from ..atomic import write_bytes_atomic

    for shown, files in given:
        matched = 0
        for path in files:
            size = path.stat().st_size
            for ref in wanted.values():
                if path.name != ref.filename or size != ref.bytes:
                    continue
                if ref.local is not None:
                    if ref.sha256 and _sha256(path) != ref.sha256:
                        inv.notes.append(f"{path}: same name and size as {ref.id}, but not the same content")
                    else:
                        matched += 1
                    continue
                local = Path("files") / f"{_safe_id(ref.id)}.jsonl"
                write_bytes_atomic(root / local, path.read_bytes())  # atomic: a crash leaves no torn copy
                ref.local, ref.source, ref.matched_from, ref.sha256 = str(local), "matched", str(path), _sha256(path)
                matched += 1
        if matched == 0:
            names = sorted({f"{r.filename} ({r.bytes} bytes)" for r in wanted.values()})
            raise DataError(
                f"matches none of the organisation's {len(names)} training and validation files by name and size",
                path=shown,
                hint="OpenAI's files are: " + (", ".join(names[:8]) + (" ..." if len(names) > 8 else "") or "none"),
            )


def _models(inv: Inventory, fine_tunes: dict[str, Any], table: dict[str, dt.date] | None) -> None:
    """One entry per fine-tuned model: each succeeded job's, and each one listed without a job."""
    seen = set()
    for job in inv.manifest.jobs:
        if job.status != JobStatus.SUCCEEDED or not job.fine_tuned_model:
            continue
        listed = fine_tunes.get(job.fine_tuned_model)
        inv.manifest.models.append(
            mf.Model(
                id=job.fine_tuned_model,
                key=mf.key_for(job.fine_tuned_model, job.id),
                base_model=job.base_model,
                job=job.id,
                serving=listed is not None,
                stops_serving=_stops(job.fine_tuned_model, listed, table),
                owned_by=getattr(listed, "owned_by", None),
            )
        )
        seen.add(job.fine_tuned_model)
    for model_id, listed in fine_tunes.items():
        if model_id not in seen:
            inv.manifest.models.append(
                mf.Model(
                    id=model_id,
                    key=mf.key_for(model_id, None),
                    base_model=base_of(model_id),
                    serving=True,
                    stops_serving=_stops(model_id, listed, table),
                    owned_by=getattr(listed, "owned_by", None),
                )
            )


def _stops(model_id: str, listed: Any, table: dict[str, dt.date] | None) -> dt.date | None:
    """OpenAI's own ``shutdown_date`` where /v1/models gives one, else the dated table."""
    given = _get(listed, "shutdown_date") if listed is not None else None
    if given:
        try:
            return dt.date.fromisoformat(str(given)[:10])
        except ValueError:
            pass
    return stops_serving(model_id, table)
