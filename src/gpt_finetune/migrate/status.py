"""``migrate status``: where each model's move stands, read back from the directory and the store."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import UNSUCCESSFUL, JobStatus
from . import manifest as mf
from .record import batches_path, prompts_path, recordings
from .retrain import local_jobs


@dataclass
class Step:
    model: mf.Model
    days_left: int | None
    prompts: int | None  # the fixed prompt set's size, once recorded
    recorded: int
    batch: str | None  # a Batch API round still open
    local_job: dict[str, Any] | None
    alias: str | None  # the local model the old id names
    compared: bool
    missing: list[str] = field(default_factory=list)

    @property
    def phase(self) -> str:
        if self.compared:
            return "compared"
        if self.alias:
            return "aliased"
        if self.local_job is not None:
            return (
                "retrained"
                if self.local_job["status"] == JobStatus.SUCCEEDED
                else f"retraining ({self.local_job['status']})"
            )
        if self.recorded:
            return f"recorded {self.recorded}/{self.prompts}"
        return "inventoried"


def days_left(stops: dt.date | None, today: dt.date) -> int | None:
    return (stops - today).days if stops is not None else None


def steps(services: Any | None, root: Path, manifest: mf.Manifest, today: dt.date) -> list[Step]:
    """Each model's state. Without ``services`` (no local engine) the local columns stay empty."""
    out = []
    for model in manifest.models:
        job = manifest.job(model.job)
        path = prompts_path(root, model.key)
        n_prompts = (
            sum(1 for x in path.read_text(encoding="utf-8").splitlines() if x.strip()) if path.is_file() else None
        )
        n_recorded = len(recordings(root, model.key))
        batch = None
        if batches_path(root, model.key).is_file():
            rounds = json.loads(batches_path(root, model.key).read_text(encoding="utf-8")).get("rounds") or []
            if rounds and not rounds[-1].get("ingested"):
                batch = f"{rounds[-1].get('batch')} ({rounds[-1].get('status')})"
        local = None
        alias = None
        if services is not None:
            found = local_jobs(services, model.job or model.key)
            local = next((j for j in found if j["status"] not in UNSUCCESSFUL), found[0] if found else None)
            target = services.models.resolve(model.id)
            alias = target if target != model.id else None
        step = Step(
            model,
            days_left(model.stops_serving, today),
            n_prompts,
            n_recorded,
            batch,
            local,
            alias,
            (root / "compare" / model.key / "compare.json").is_file(),
        )
        left = step.days_left
        if n_prompts is None or n_recorded < n_prompts:
            if left is not None and left < 0:
                step.missing.append("cannot be recorded: it stopped serving")
            elif n_prompts is None:
                step.missing.append("record")
            else:
                step.missing.append(f"record {n_prompts - n_recorded} more")
        if job is None and not n_recorded:
            step.missing.append("no OpenAI job visible: retrain --from-recordings after record")
        elif job is not None and job.method != "supervised":
            step.missing.append(f"{job.method}: not retrainable yet")
        elif job is not None and (job.training_file is None or not job.training_file.local) and not n_recorded:
            step.missing.append("training file: give --data")
        if local is None:
            step.missing.append("retrain")
        elif local["status"] in UNSUCCESSFUL:
            step.missing.append(f"retrain again (local job {local['status']})")
        elif local["status"] == JobStatus.SUCCEEDED and not alias:
            step.missing.append("alias (migrate retrain)")
        if not step.compared and n_recorded:
            step.missing.append("compare")
        out.append(step)
    return out
