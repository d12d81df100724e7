"""The migration directory's manifest: what OpenAI said about the organisation, and what was found.

Declared with pydantic (which the openai SDK already brings) so that a manifest edited by hand
into something else is refused with one error naming the file and the field, before any step
acts on it. Paths inside it are relative to the migration directory and never leave it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError, DataError

FORMAT: Literal["gpt-finetune-migration"] = "gpt-finetune-migration"
MANIFEST = "manifest.json"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRef(_Strict):
    """One of OpenAI's files, and where its content is in the migration directory, if anywhere."""

    id: str = Field(min_length=1, max_length=256)
    filename: str | None = None
    bytes: int | None = Field(default=None, ge=0)
    purpose: str | None = None
    local: str | None = None  # relative to the migration directory
    source: Literal["downloaded", "matched"] | None = None
    matched_from: str | None = None  # the user's copy it was taken from
    sha256: str | None = None
    refused: str | None = None  # what OpenAI answered when its content was asked for

    @field_validator("local")
    @classmethod
    def _inside(cls, value: str | None) -> str | None:
        if value is not None and (Path(value).is_absolute() or ".." in Path(value).parts or not value.strip()):
            raise ValueError("must be a path inside the migration directory")
        return value


class Checkpoint(_Strict):
    id: str
    step_number: int = Field(ge=0)
    model: str
    metrics: dict[str, Any] = Field(default_factory=dict)


class Job(_Strict):
    id: str = Field(min_length=1, max_length=256)
    status: str
    base_model: str
    fine_tuned_model: str | None = None
    created_at: int
    finished_at: int | None = None
    method: str = "supervised"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    suffix: str | None = None
    training_file: FileRef | None = None
    validation_file: FileRef | None = None
    result_files: list[FileRef] = Field(default_factory=list)
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    error: str | None = None


class Model(_Strict):
    """A fine-tuned model to move: one a succeeded job made, or one the organisation can call."""

    id: str = Field(min_length=1, max_length=512)
    key: str  # names its files in the migration directory
    base_model: str
    job: str | None = None
    serving: bool  # listed by OpenAI's /v1/models at the inventory
    stops_serving: dt.date | None = None
    owned_by: str | None = None

    @field_validator("key")
    @classmethod
    def _safe_key(cls, value: str) -> str:
        if not _KEY.fullmatch(value) or ".." in value:
            raise ValueError("must be letters, digits and _ . - (it names files)")
        return value


class Manifest(_Strict):
    format: Literal["gpt-finetune-migration"] = FORMAT
    version: Literal[1] = 1
    migration_id: str = Field(min_length=1, max_length=64)  # marks this migration's batches at OpenAI
    organization: str | None = None
    source: str  # the API base URL the inventory was taken from
    inventoried_at: int
    today: dt.date  # the day the inventory took as today
    training_ends: dt.date
    jobs: list[Job] = Field(default_factory=list)
    models: list[Model] = Field(default_factory=list)

    def job(self, job_id: str | None) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id), None) if job_id else None

    def find(self, name: str) -> Model | None:
        """A model by its id, its key or its job id."""
        return next((m for m in self.models if name in (m.id, m.key, m.job)), None)


def key_for(model_id: str, job_id: str | None) -> str:
    """Names a model's files: its OpenAI job id when it is a safe name, else a hash of its id."""
    if job_id and _KEY.fullmatch(job_id) and ".." not in job_id:
        return job_id
    return "model-" + hashlib.sha256(model_id.encode()).hexdigest()[:12]


def manifest_path(directory: str | Path) -> Path:
    return Path(directory) / MANIFEST


def load(directory: str | Path) -> Manifest:
    """The manifest of a migration directory; one clear error for anything else."""
    path = manifest_path(directory)
    if not path.is_file():
        raise ConfigError(
            f"{directory} is not a migration directory (no {MANIFEST})",
            hint=f"start one with: gpt-finetune migrate inventory -o {directory}",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot be read: {exc}", path=path) from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise DataError(
            f"not JSON: {getattr(exc, 'msg', exc)}",
            path=path,
            line=getattr(exc, "lineno", None),
            hint=f"restore it, or take the inventory again: gpt-finetune migrate inventory -o {directory}",
        ) from None
    if isinstance(raw, dict) and raw.get("format") not in (None, FORMAT):
        raise DataError(f"not a migration manifest (format {str(raw.get('format'))[:40]!r})", path=path)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        raise DataError(
            f"{first['msg']} ({exc.error_count()} problem(s) in all)",
            path=path,
            field=where or None,
            hint=f"fix it by hand, or take the inventory again: gpt-finetune migrate inventory -o {directory}",
        ) from None


def save(directory: str | Path, manifest: Manifest) -> Path:
    from ..atomic import write_text_atomic

    path = manifest_path(directory)
    write_text_atomic(path, json.dumps(manifest.model_dump(mode="json"), indent=1, ensure_ascii=False) + "\n")
    return path
