"""Fine-tuning jobs with OpenAI's semantics, trained by a local worker process.

A job's states and the moves between them are the contract's (``contract.TRANSITIONS``; every
update here is conditioned on the states it may come from). Creating a job stores what was asked
(``contract.JobSpec``) and makes sure a runner is alive, through the launcher the adapters give
(``worker.launch``): a detached process that holds ``runner.lock``, checks new jobs' files (a bad
file fails the job with OpenAI's codes; a good one stores the resolved description and queues
it), trains queued jobs one at a time, and exits when none are left. Nothing needs starting by
hand: every start of the CLI's local backend or the server calls ``kick``.

A job whose worker died is found by the next runner (it holds the lock, so any ``running`` job
is orphaned) and resumed from its last checkpoint, at most ``MAX_ATTEMPTS`` times in all; then
it fails with ``worker_died``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..base_catalog import check_trainable
from ..contract import (
    AUTO,
    CLASSIFICATION_DEFAULTS,
    CLASSIFICATION_EPOCHS,
    DPO_DEFAULTS,
    METHODS,
    MIN_EXAMPLES,
    NEEDS_RUNNER,
    SEED_MAX,
    TERMINAL,
    JobSpec,
    JobStatus,
    LabelSets,
    LocalOptions,
    SupervisedHyperparameters,
    sources,
    sql_in,
)
from ..data.analysis import analyze_file
from ..errors import BackendError, DataError, NotFoundError
from ..home import Home, safe_name
from ..request_rules import check_names
from ..request_rules import hyperparameters as checked_hyperparameters
from ..store import Store, new_id, now
from .files import FileService
from .models import ModelService
from .workers import WorkerService

S = JobStatus
MAX_ATTEMPTS = 3
# How long a claimed job is held without its runner renewing the lease (it renews every third of
# it). Only a shared store (PostgreSQL) needs it: there a runner cannot tell from a lock whether
# the runner of another machine, or one whose database session a restart dropped, is alive.
LEASE_SECONDS = 30
# starts a runner for a data directory (worker.launch), with what its environment needs beyond
# the user's (the store's URL where it is not the data directory's file)
Launcher = Callable[[Home, dict[str, str]], None]


class RunnerLock:
    """Held by the one runner of a store while it lives (``Store.try_lock``: for the default SQLite
    store a file lock beside it in the data directory; for a PostgreSQL store, which several
    machines may share, an advisory lock in the database), so that there is one runner in all: its ``recover_orphans`` then never
    takes a job another machine is training for an orphan. (Workers on several machines, each
    holding its jobs under a lease, are issue 26's next part.)"""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._held: Any = None

    def acquire(self, attempts: int = 10, wait: float = 0.05) -> bool:
        """Take it without blocking. A client's ``runner_alive`` probe holds it for microseconds, a
        runner for as long as it lives: a few tries apart tell them apart, so a probe at the wrong
        moment does not make a runner leave jobs waiting with no runner at all."""
        for attempt in range(attempts):
            if self._try():
                return True
            if attempt + 1 < attempts:
                time.sleep(wait)
        return False

    def _try(self) -> bool:
        self._held = self.store.try_lock("runner")
        return self._held is not None

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self.store.unlock(held)


class JobService:
    def __init__(
        self,
        store: Store,
        home: Home,
        files: FileService,
        models: ModelService,
        launcher: Launcher | None = None,
        workers: WorkerService | None = None,
    ) -> None:
        self.store = store
        self.home = home
        self.files = files
        self.models = models
        # the adapters (the CLI's local backend, the server) give the launcher; without one (the
        # worker's own processes, which never start a runner) ``kick`` starts nothing
        self.launcher = launcher
        self.workers = workers or WorkerService(store)
        self.lease_seconds = LEASE_SECONDS  # a worker may hold its jobs under a shorter or longer lease
        self._kicked_at = 0.0  # when retrieve last looked for a runner (time.monotonic)

    # ---- create -------------------------------------------------------------------------
    def create(
        self,
        *,
        model: str,
        training_file: str,
        validation_file: str | None = None,
        hyperparameters: SupervisedHyperparameters | Mapping[str, Any] | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        metadata: dict[str, str] | None = None,
        options: LocalOptions | Mapping[str, Any] | None = None,
        method: str = "supervised",
        start: bool = True,
    ) -> dict[str, Any]:
        """Create a job. ``method`` is OpenAI's (``supervised`` or ``dpo``), ``hyperparameters``
        that method's. ``options`` are local-only settings (LoRA, checkpointing, processes):
        ``LocalOptions``, or settings keys (``lora_r``) with defaults for the rest."""
        if method not in METHODS:
            raise BackendError(
                f"method must be one of {', '.join(METHODS)}, got {method!r}", code="unsupported_method", param="method"
            )
        check_names(suffix=suffix, seed=seed)
        base, adapter = self.models.starting_point(model)
        check_trainable(base)
        hp = checked_hyperparameters(hyperparameters, method)
        local = options if isinstance(options, LocalOptions) else _local_options(options or {})
        train = self.files.retrieve(training_file)
        valid = self.files.retrieve(validation_file) if validation_file else None
        for param, file in (("training_file", train), ("validation_file", valid)):
            if file is not None and file["purpose"] != "fine-tune":
                raise BackendError(
                    f"{param} {file['id']} was uploaded with purpose {file['purpose']!r}, not 'fine-tune'",
                    code="invalid_file_purpose",
                    param=param,
                )
        job_id = new_id("ftjob")
        seed = seed if seed is not None else random.randint(0, SEED_MAX)
        meta = dict(metadata or {})
        row = {
            "id": job_id,
            "created_at": now(),
            "model": model,
            "base_model": base.id,
            "status": S.VALIDATING_FILES,
            "training_file": train["id"],
            "validation_file": valid["id"] if valid else None,
            "hyperparameters": hp.to_json(),
            "method": {"type": method},
            "suffix": suffix,
            "seed": seed,
            "metadata": meta or None,
            # the description as asked; resolved (epochs, batch size, label sets) and stored
            # again, once, when the files are checked
            "spec": JobSpec(
                base=base.location if base.source != "gguf" else base.id,
                method=method,
                hyperparameters=hp,
                local=local,
                init_adapter=adapter,
            ).to_json(),
        }
        self.store.insert("jobs", row)
        if adapter is not None:
            self.event(job_id, f"{model} is trained further: its adapter continues, on base model {base.id}")
        elif model != base.id:
            self.event(job_id, f"{model} is trained locally as base model {base.id}")
        self.event(
            job_id,
            f"Validating training file: {train['id']}" + (f" and validation file: {valid['id']}" if valid else ""),
        )
        # the files are checked by the runner (``validate_pending``), as OpenAI does it
        # asynchronously: creating a job over HTTP never waits on a large file
        if start:
            self.kick()
        return self.to_openai(self._row(job_id))

    def validate_pending(self, pid: int) -> list[str]:
        """Check the files of every job in ``validating_files`` (each claimed atomically, so two
        processes never check the same job) and move it to ``queued`` or ``failed``. Returns the
        ids it checked."""
        done: list[str] = []
        while True:
            waiting = sql_in([S.VALIDATING_FILES]) + " AND worker_pid IS NULL"
            rows = self.store.query(f"SELECT id FROM jobs WHERE {waiting} ORDER BY created_at, rowid LIMIT 1")
            if not rows:
                return done
            job_id = rows[0]["id"]
            # the lease lets a worker on another machine check the files again if this one dies
            # meanwhile (recover_orphans); a check that outlasts it is at worst done twice, to the
            # same verdict
            claim = {"worker_pid": pid, "lease_until": now() + self.lease_seconds}
            if not self.store.update("jobs", job_id, claim, where=waiting):
                continue  # another process took it
            self._check_files(self._row(job_id))
            done.append(job_id)

    def _check_files(self, row: dict[str, Any]) -> None:
        job_id = row["id"]
        error: dict[str, Any] | None
        try:
            train = self.files.retrieve(row["training_file"])
            valid = self.files.retrieve(row["validation_file"]) if row["validation_file"] else None
        except NotFoundError as exc:  # deleted between create and validation
            error, n_train = {"code": "invalid_training_file", "param": "training_file", "message": exc.message}, 0
        else:
            kind = JobSpec.from_row(row).method
            error, n_train = self._validate(train, "training_file", kind)
            if error is None and valid:
                error, _ = self._validate(valid, "validation_file", kind)
        if error:
            if self._finish(job_id, S.FAILED, error=error, worker_pid=None):
                self.event(job_id, f"Training file validation failed: {error['message']}", level="error")
            return
        asked = JobSpec.from_row(row)
        # a classification job: what constrained prediction chooses among, and its own defaults
        labels = self._label_sets(train["path"]) if asked.method == "supervised" else None
        # a method's or a classification job's own defaults, where the caller chose nothing
        defaults = DPO_DEFAULTS if asked.method == "dpo" else CLASSIFICATION_DEFAULTS if labels else None
        local, applied = asked.local.for_classification(defaults) if defaults else (asked.local, {})
        hyperparameters = asked.hyperparameters.resolved(n_train, CLASSIFICATION_EPOCHS if labels else None)
        if labels is not None and asked.hyperparameters.n_epochs == AUTO:
            applied["n_epochs"] = hyperparameters.n_epochs
        spec = dataclasses.replace(asked, hyperparameters=hyperparameters, labels=labels, local=local)
        if self.store.update(
            "jobs",
            job_id,
            {
                "status": S.QUEUED,
                "queued_at": now(),
                "worker_pid": None,
                "hyperparameters": spec.hyperparameters.to_json(),
                "spec": spec.to_json(),
                # data-parallel processes are one a GPU (worker.runner.child_command); one process
                # trains on whatever the worker has
                "need_gpus": spec.local.run.num_processes if spec.local.run.num_processes > 1 else 0,
            },
            where=sql_in([S.VALIDATING_FILES]),
        ):
            if applied and asked.method == "dpo":
                chosen = ", ".join(f"{k} = {v}" for k, v in applied.items())
                self.event(
                    job_id,
                    f"Preference training: {chosen} (no dropout, as TRL's DPOTrainer does: the policy's "
                    "log-probabilities then compare with the reference's; set it to choose otherwise)",
                )
            if applied and labels is not None:
                chosen = ", ".join(f"{k} = {','.join(v) if isinstance(v, tuple) else v}" for k, v in applied.items())
                self.event(
                    job_id,
                    f"Classification data ({len(labels.labels)} labels): training with the classification "
                    f"defaults {chosen} (set any of them to choose otherwise)",
                )
            self.event(job_id, "Files validated, moving job to queued state")

    def check_request(self, *, model: str, suffix: str | None = None, seed: int | None = None) -> Any:
        """What can be refused before a file is uploaded: the model (and whether this machine can
        train it), the suffix and the seed. Returns the base model."""
        check_names(suffix=suffix, seed=seed)
        base, _ = self.models.starting_point(model)
        check_trainable(base)
        return base

    @staticmethod
    def _label_sets(path: str) -> LabelSets | None:
        """The label sets of a training file whose answers are all label lists, else None."""
        from ..data.labels import label_sets
        from ..data.readers import loads

        answers = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    try:
                        messages = loads(line).get("messages") or []
                    except (ValueError, AttributeError, RecursionError):
                        return None
                    last = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
                    if not last or not isinstance(last[-1].get("content"), str):
                        return None
                    answers.append(last[-1]["content"])
        return LabelSets.from_json(label_sets(answers))

    def _validate(
        self, file: dict[str, Any], param: str, method: str = "supervised"
    ) -> tuple[dict[str, Any] | None, int]:
        """(OpenAI-style error or None, number of valid examples): a ``dpo`` job's files hold
        preference pairs, a ``supervised`` job's chat examples."""
        try:
            report = analyze_file(file["path"], None, count_tokens=False, workers=1)
        except Exception as exc:  # a whole-file problem: not JSONL, empty, unreadable
            # named by the client's file name: the message must not show where it lies on the server
            why = exc.detail if isinstance(exc, DataError) else str(exc).replace(str(file["path"]), file["filename"])
            return {
                "code": "invalid_training_file" if param == "training_file" else "invalid_validation_file",
                "param": param,
                "message": f"{file['filename']}: {why}",
            }, 0
        errors = report.errors
        if errors and errors[0].code != "invalid_n_examples":
            f = errors[0]
            where = f"line {f.line}" + (f", {f.field}" if f.field else "")
            return {
                "code": "invalid_training_file" if param == "training_file" else "invalid_validation_file",
                "param": param,
                "message": f"{file['filename']} has {report.n_errors} format errors; the first, at {where}: {f.message}",
            }, report.n_examples
        want = "preference" if method == "dpo" else "chat"
        other = report.first_line.get("chat" if want == "preference" else "preference")
        if other is not None:
            needs = (
                "preference pairs (input, preferred_output, non_preferred_output)"
                if want == "preference"
                else "chat examples (messages); preference pairs train with method dpo"
            )
            return {
                "code": "invalid_training_file" if param == "training_file" else "invalid_validation_file",
                "param": param,
                "message": f"{file['filename']}: a {method} job needs {needs}; line {other} is not one",
            }, report.n_examples
        if param == "training_file" and report.n_examples < MIN_EXAMPLES:
            return {
                "code": "invalid_n_examples",
                "param": param,
                "message": f"Training file has {report.n_examples} example(s), but must have at least {MIN_EXAMPLES} examples",
            }, report.n_examples
        return None, report.n_examples

    # ---- read ---------------------------------------------------------------------------
    def _row(self, job_id: str) -> dict[str, Any]:
        row = self.store.get("jobs", safe_name(job_id, "job"))
        if row is None:
            raise NotFoundError(f"Job with id '{job_id}' not found.", code="job_not_found")
        return row

    def retrieve(self, job_id: str) -> dict[str, Any]:
        """The job, in OpenAI's shape. Whoever follows an unfinished job also keeps a runner
        alive for it (at most every 2 s): a runner killed outright (the OOM killer, a power cut
        of its process group) would otherwise leave the job ``running`` until the next job was
        created, and one kick at start-up can fall just before a dying runner lets go of its lock."""
        row = self._row(job_id)
        if row["status"] in NEEDS_RUNNER and time.monotonic() - self._kicked_at > 2.0:
            self._kicked_at = time.monotonic()
            self.kick()
        return self.to_openai(row)

    def row(self, job_id: str) -> dict[str, Any]:
        return self._row(job_id)

    def status(self, job_id: str) -> JobStatus:
        return JobStatus(self._row(job_id)["status"])

    def spec(self, job_id: str) -> JobSpec:
        """The job's description: resolved once its files were checked, as asked before."""
        return JobSpec.from_row(self._row(job_id))

    def list_jobs(
        self, *, limit: int = 20, after: str | None = None, metadata: dict[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, after the job ``after``; ``metadata`` keeps jobs whose metadata has
        every one of these key-value pairs."""
        params: list[Any] = []
        where = []
        if after:
            cursor = self.store.query("SELECT rowid AS r, created_at FROM jobs WHERE id = ?", (after,))
            if not cursor:
                raise NotFoundError(f"Job with id '{after}' not found.", code="job_not_found", param="after")
            where.append("(created_at < ? OR (created_at = ? AND rowid < ?))")
            params += [cursor[0]["created_at"], cursor[0]["created_at"], cursor[0]["r"]]
        for key, value in (metadata or {}).items():
            field, field_params = self.store.json_field("metadata", key)
            where.append(f"{field} = ?")
            params += [*field_params, value]
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.store.query(f"{sql} ORDER BY created_at DESC, rowid DESC LIMIT ?", [*params, limit + 1])
        return [self.to_openai(r) for r in rows[:limit]], len(rows) > limit

    def list_events(
        self, job_id: str, *, limit: int = 20, after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        self._row(job_id)
        params: list[Any] = [job_id]
        where = "job_id = ?"
        if after:
            where += " AND seq < (SELECT seq FROM events WHERE id = ?)"
            params.append(after)
        rows = self.store.query(f"SELECT * FROM events WHERE {where} ORDER BY seq DESC LIMIT ?", [*params, limit + 1])
        events = [
            {
                "id": r["id"],
                "object": "fine_tuning.job.event",
                "created_at": r["created_at"],
                "level": r["level"],
                "message": r["message"],
                "type": r["type"],
                "data": r["data"] or {},
            }
            for r in rows[:limit]
        ]
        return events, len(rows) > limit

    def list_checkpoints(
        self, job_id: str, *, limit: int = 10, after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        self._row(job_id)
        params: list[Any] = [job_id]
        where = "job_id = ?"
        if after:
            where += " AND step_number < (SELECT step_number FROM checkpoints WHERE id = ?)"
            params.append(after)
        rows = self.store.query(
            f"SELECT * FROM checkpoints WHERE {where} ORDER BY step_number DESC LIMIT ?", [*params, limit + 1]
        )
        out = [
            {
                "id": r["id"],
                "object": "fine_tuning.job.checkpoint",
                "created_at": r["created_at"],
                "fine_tuned_model_checkpoint": r["fine_tuned_model_checkpoint"],
                "fine_tuning_job_id": job_id,
                "metrics": r["metrics"],
                "step_number": r["step_number"],
            }
            for r in rows[:limit]
        ]
        return out, len(rows) > limit

    # ---- write --------------------------------------------------------------------------
    def event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        self.store.insert(
            "events",
            {
                "id": new_id("ftevent"),
                "job_id": job_id,
                "created_at": now(),
                "level": level,
                "message": message,
                "type": type,
                "data": data,
            },
        )

    def details(self, job_id: str) -> dict[str, Any]:
        """What OpenAI's job object has no field for: every hyperparameter as resolved, the local
        training options, the label sets of a classification job (what a label-constrained
        answer chooses among) and the memory plan its worker made (None before it started)."""
        from ..local.memory import MemoryPlan

        row = self._row(job_id)
        spec = JobSpec.from_row(row)
        plan = row.get("plan")
        try:
            summary = MemoryPlan.from_dict(plan).describe() if plan else None
        except (TypeError, KeyError, ZeroDivisionError):  # a plan of an older release lacks fields
            summary = None
        return {
            "object": "fine_tuning.job.details",
            "id": row["id"],
            "method": spec.method,
            "hyperparameters": spec.hyperparameters.to_json(),
            "local": spec.local.to_json(),
            "labels": spec.labels.to_json() if spec.labels else None,
            "plan": plan,
            "plan_summary": summary,
        }

    def set_plan(self, job_id: str, plan: dict[str, Any]) -> None:
        """Keep the memory plan a job's worker made, so that a resumed job trains the same steps,
        and only on a worker with the memory the plan needs (its estimated peak). Before a job's
        first start there is no plan, and any worker may take it: the plan is made against that
        worker's memory (``memory_limit_gb`` caps it, and asks no more of the worker than that)."""
        need = math.ceil(int(plan.get("estimated_peak_bytes") or 0) / 1e7) / 100  # GB, rounded up
        self.store.update("jobs", job_id, {"plan": plan, "need_memory_gb": need or None})

    def cancel(self, job_id: str) -> dict[str, Any]:
        row = self._row(job_id)
        if row["status"] in TERMINAL:
            raise BackendError(
                f"Job {job_id} has already {'been ' if row['status'] == S.CANCELLED else ''}"
                f"{row['status']}; it cannot be cancelled",
                code="job_not_cancellable",
                status=409,
            )
        # the worker polls the status and stops; the runner kills it if it does not stop in time
        if self.store.update(
            "jobs", job_id, {"status": S.CANCELLED, "finished_at": now()}, where=sql_in(sources(S.CANCELLED))
        ):
            self.event(job_id, "Job was cancelled")
        return self.to_openai(self._row(job_id))

    def pause(self, job_id: str) -> dict[str, Any]:
        """Pause a queued or running job. A running job's worker saves a checkpoint and stops,
        which frees the runner for other jobs; ``resume`` continues from that checkpoint."""
        row = self._row(job_id)
        if not self.store.update("jobs", job_id, {"status": S.PAUSED}, where=sql_in(sources(S.PAUSED))):
            raise BackendError(
                f"Job {job_id} is {row['status']}; only a queued or running job can be paused",
                code="job_not_pausable",
                status=409,
            )
        self.event(job_id, "Job paused" + (": saving a checkpoint" if row["status"] == S.RUNNING else ""))
        return self.to_openai(self._row(job_id))

    def resume(self, job_id: str) -> dict[str, Any]:
        """Queue a paused job again; it continues from its last checkpoint."""
        row = self._row(job_id)
        if not self.store.update("jobs", job_id, {"status": S.QUEUED, "queued_at": now()}, where=sql_in([S.PAUSED])):
            raise BackendError(
                f"Job {job_id} is {row['status']}; only a paused job can be resumed",
                code="job_not_resumable",
                status=409,
            )
        self.event(job_id, "Job resumed")
        self.kick()
        return self.to_openai(self._row(job_id))

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: dict[str, Any] | None = None,
        where: str = "",
        params: tuple = (),
        **changes: Any,
    ) -> bool:
        """Move a job to a terminal state, from a state that may go there (a cancel wins); ``where``
        narrows it further."""
        return self.store.update(
            "jobs",
            job_id,
            {"status": status, "finished_at": now(), "error": error, **changes},
            where=sql_in(sources(status)) + (f" AND {where}" if where else ""),
            params=params,
        )

    def succeed(self, job_id: str, *, held_by: str | None = None, attempt: int | None = None, **changes: Any) -> bool:
        """Mark a job succeeded; with ``held_by`` (and ``attempt``), only while that worker holds
        it (in that attempt)."""
        if held_by is None:
            return self._finish(job_id, S.SUCCEEDED, **changes)
        where, params = "worker_id = ?", tuple[Any, ...]((held_by,))
        if attempt is not None:
            where, params = where + " AND attempts = ?", (held_by, attempt)
        return self._finish(job_id, S.SUCCEEDED, where=where, params=params, **changes)

    def fail(self, job_id: str, code: str, message: str) -> bool:
        ok = self._finish(job_id, S.FAILED, error={"code": code, "message": message, "param": None})
        if ok:
            self.event(job_id, f"Job failed: {message}", level="error")
        return ok

    def add_checkpoint(
        self, job_id: str, *, step: int, path: str, metrics: dict[str, Any], model_id: str, base: str
    ) -> None:
        """Record a checkpoint the trainer saved (and its model id), and forget the older ones
        whose directories the trainer removed (it keeps the last 3)."""
        from pathlib import Path

        ckpt_id = f"{model_id}:ckpt-step-{step}"
        with self.store.tx() as conn:
            conn.execute("DELETE FROM checkpoints WHERE fine_tuned_model_checkpoint = ?", (ckpt_id,))
        self.store.insert(
            "checkpoints",
            {
                "id": f"ftckpt-{job_id.split('-', 1)[1]}-{step}",
                "job_id": job_id,
                "created_at": now(),
                "step_number": step,
                "fine_tuned_model_checkpoint": ckpt_id,
                "path": path,
                "metrics": {k: v for k, v in metrics.items() if k != "total_steps"},
            },
        )
        self.models.register(ckpt_id, kind="checkpoint", base=base, path=Path(path), job_id=job_id)
        for row in self.store.query(
            "SELECT id, path, fine_tuned_model_checkpoint FROM checkpoints WHERE job_id = ?", (job_id,)
        ):
            if row["path"] != path and not Path(row["path"]).exists():
                self.store.delete("checkpoints", row["id"])
                self.models.forget(row["fine_tuned_model_checkpoint"])
        self.event(job_id, f"Checkpoint created at step {step}")

    def metrics_rows(self, job_id: str) -> list[dict[str, Any]]:
        """The data of a job's metrics events, oldest first (the result CSV and loss plots)."""
        return [
            e["data"]
            for e in self.store.query(
                "SELECT data FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY seq", (job_id,)
            )
        ]

    def complete(
        self,
        job_id: str,
        *,
        model_id: str,
        base: str,
        model_path: str,
        trained_tokens: int,
        result_path: str,
        held_by: str | None = None,
        attempt: int | None = None,
    ) -> bool:
        """A job's worker finished: keep its result file and model, and mark it succeeded. A job
        cancelled at the last moment keeps nothing (False). With ``held_by`` (the worker's id),
        a job that worker no longer holds (its lease lapsed, another worker took it) is left
        alone: that worker records the model, under the same id."""
        from pathlib import Path

        if held_by is not None and not self.holds(job_id, held_by, attempt):
            return False
        result_file = self.files.register(Path(result_path), "step_metrics.csv", "fine-tune-results")
        self.models.register(model_id, kind="fine-tuned", base=base, path=Path(model_path), job_id=job_id)
        self.event(job_id, f"New fine-tuned model created: {model_id}")
        if self.succeed(
            job_id,
            held_by=held_by,
            attempt=attempt,
            fine_tuned_model=model_id,
            trained_tokens=trained_tokens,
            result_files=[result_file["id"]],
        ):
            self.event(job_id, "The job has successfully completed")
            return True
        self.models.forget(model_id)
        return False

    # ---- the worker ---------------------------------------------------------------------
    def claim_next(
        self, pid: int, *, worker_id: str | None = None, gpus: int | None = None, memory_gb: float | None = None
    ) -> dict[str, Any] | None:
        """The oldest queued job that fits (``gpus``, ``memory_gb``: what the claiming worker has;
        None, no limit), now ``running`` for process ``pid`` of worker ``worker_id`` under a lease
        of ``lease_seconds`` (files of new jobs are checked first). One short transaction: the row
        lock of ``claim_lock`` (PostgreSQL's FOR UPDATE SKIP LOCKED) lets claimers on other
        machines pass over a row one of them is taking instead of waiting for it."""
        self.validate_pending(pid)
        fits, params = self._fits(gpus, memory_gb)
        with self.store.tx() as conn:
            row = conn.execute(
                f"SELECT id FROM jobs WHERE {sql_in([S.QUEUED])}{fits} ORDER BY created_at, rowid LIMIT 1"
                + self.store.claim_lock,
                params,
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, worker_pid = ?, worker_id = ?, lease_until = ? "
                "WHERE id = ?",
                (S.RUNNING.value, pid, worker_id, now() + self.lease_seconds, row["id"]),
            )
        return self._row(row["id"])

    @staticmethod
    def _fits(gpus: int | None, memory_gb: float | None) -> tuple[str, list[Any]]:
        sql, params = "", list[Any]()
        if gpus is not None:
            sql += " AND COALESCE(need_gpus, 0) <= ?"
            params.append(gpus)
        if memory_gb is not None:
            sql += " AND (need_memory_gb IS NULL OR need_memory_gb <= ?)"
            params.append(memory_gb)
        return sql, params

    def waiting_for_a_worker(self, gpus: int | None, memory_gb: float | None) -> list[dict[str, Any]]:
        """Queued jobs that a worker with ``gpus`` and ``memory_gb`` cannot take."""
        fits, params = self._fits(gpus, memory_gb)
        if not fits:
            return []
        return self.store.query(
            f"SELECT id, need_gpus, need_memory_gb FROM jobs WHERE {sql_in([S.QUEUED])} AND NOT (1 = 1{fits})", params
        )

    def requeue_or_fail(self, row: dict[str, Any], what: str, log: str) -> bool:
        """A running job lost its worker: queue it to resume from its last checkpoint, or fail it
        after ``MAX_ATTEMPTS`` attempts in all. True if it was queued again. Only the attempt
        ``row`` saw is moved: a job another worker has claimed again meanwhile (its attempt
        count went up) is that worker's."""
        same = sql_in([S.RUNNING]) + " AND attempts = ?"
        if row["attempts"] >= MAX_ATTEMPTS:
            message = f"{what} {row['attempts']} times; giving up (see {log})"
            if self._finish(
                row["id"],
                S.FAILED,
                error={"code": "worker_died", "message": message, "param": None},
                where=same,
                params=(row["attempts"],),
            ):
                self.event(row["id"], f"Job failed: {message}", level="error")
            return False
        if self.store.update(
            "jobs",
            row["id"],
            {"status": S.QUEUED, "worker_id": None, "queued_at": now()},
            where=same,
            params=(row["attempts"],),
        ):
            self.event(
                row["id"],
                f"The training worker stopped unexpectedly; {self._what_next(row['id'])}",
                level="warn",
            )
            return True
        return False

    def release(self, job_id: str, worker_id: str, why: str) -> bool:
        """A worker that is shutting down hands its running job back to the queue, to resume from
        its last checkpoint elsewhere; the attempt does not count against ``MAX_ATTEMPTS``."""
        if self.store.update(
            "jobs",
            job_id,
            {"status": S.QUEUED, "worker_id": None, "lease_until": None, "queued_at": now()},
            where=sql_in([S.RUNNING]) + " AND worker_id = ?",
            params=(worker_id,),
        ):
            self.store.execute("UPDATE jobs SET attempts = attempts - 1 WHERE id = ? AND attempts > 0", (job_id,))
            self.event(job_id, f"{why}; {self._what_next(job_id)}", level="warn")
            return True
        return False

    def _what_next(self, job_id: str) -> str:
        """What a requeued job does when a worker takes it again, as its events say it."""
        if self.store.query("SELECT 1 FROM checkpoints WHERE job_id = ? LIMIT 1", (job_id,)):
            return "the job will resume from its last checkpoint"
        return "the job will start over (it had no checkpoint yet)"

    def renew_lease(self, job_id: str, worker_id: str | None = None) -> bool:
        """The worker training ``job_id`` still holds it, for another ``lease_seconds``. False if
        it does not hold it any more (the job stopped, or its lease lapsed and another worker
        took it): the worker must stop training it."""
        where, params = sql_in([S.RUNNING]), tuple[Any, ...]()
        if worker_id is not None:
            where, params = where + " AND worker_id = ?", (worker_id,)
        return self.store.update(
            "jobs", job_id, {"lease_until": now() + self.lease_seconds}, where=where, params=params
        )

    def holds(self, job_id: str, worker_id: str, attempt: int | None = None) -> bool:
        """Whether worker ``worker_id`` still holds running job ``job_id`` (in ``attempt``, when
        given: a training process of an earlier attempt that outlived it, as one on a Ray node
        can, holds nothing once the same worker has claimed the job again)."""
        rows = self.store.query("SELECT status, worker_id, attempts FROM jobs WHERE id = ?", (job_id,))
        if not rows or rows[0]["status"] != S.RUNNING or rows[0]["worker_id"] != worker_id:
            return False
        return attempt is None or rows[0]["attempts"] == attempt

    def recover_orphans(self, *, startup: bool = True) -> list[str]:
        """Called by a runner that holds the lock, or a worker. On the data directory's own store
        every ``running`` job lost its worker (the lock proves no other runner lives), and a job
        whose file check was cut short is checked again. On a shared store only a running job
        whose lease lapsed did (another machine's worker may be training the others), and likewise a
        file check."""
        shared = self.store.shared
        if startup and not shared:
            self.store.execute(f"UPDATE jobs SET worker_pid = NULL WHERE {sql_in([S.VALIDATING_FILES])}")
        elif shared:
            self.store.execute(
                f"UPDATE jobs SET worker_pid = NULL WHERE {sql_in([S.VALIDATING_FILES])} "
                "AND worker_pid IS NOT NULL AND (lease_until IS NULL OR lease_until < ?)",
                (now(),),
            )
        sql, params = f"SELECT * FROM jobs WHERE {sql_in([S.RUNNING])}", []
        if shared:
            sql += " AND (lease_until IS NULL OR lease_until < ?)"
            params.append(now())
        return [
            row["id"]
            for row in self.store.query(sql, params)
            if self.requeue_or_fail(row, "the training worker died", str(self.home.logs / "runner.log"))
        ]

    def note_queued(self, message: str) -> None:
        """Say on each queued job why it waits (a runner that cannot start its executor), once:
        a job whose newest event says so already gets no second one at the next try."""
        for row in self.store.query(f"SELECT id FROM jobs WHERE {sql_in([S.QUEUED])}"):
            last = self.store.query(
                "SELECT message FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT 1", (row["id"],)
            )
            if not last or last[0]["message"] != message:
                self.event(row["id"], message, level="warn")

    def has_active(self) -> bool:
        return bool(self.store.query(f"SELECT 1 FROM jobs WHERE {sql_in(NEEDS_RUNNER)} LIMIT 1"))

    def runner_lock(self) -> RunnerLock:
        return RunnerLock(self.store)

    def runner_alive(self) -> bool:
        lock = self.runner_lock()
        if not lock.acquire(attempts=1):
            return True
        lock.release()
        return False

    def kick(self) -> bool:
        """Start a runner (through the launcher) if jobs wait and none is alive. True if one was
        started. On a shared store that has had workers started by hand (``gpt-finetune
        worker``) in the last day, the store is theirs: this
        machine (a server's, say, without a GPU) starts no runner of its own, even while every
        worker is stopped for maintenance, and the jobs wait in the queue for one."""
        if self.launcher is None or not self.has_active() or self.runner_alive():
            return False
        if self.store.shared and self.workers.seen("worker"):
            return False
        env = self.store.environment()
        if self.home.model_cache is not None:  # given by a flag or config file: the runner reads the environment
            env["GPT_FINETUNE_MODEL_CACHE"] = str(self.home.model_cache)
        self.launcher(self.home, env)
        return True

    # ---- shapes -------------------------------------------------------------------------
    def to_openai(self, row: dict[str, Any]) -> dict[str, Any]:
        hp = row["hyperparameters"]  # OpenAI's view of the spec's, kept with it (``_check_files``)
        kind = (row.get("method") or {}).get("type", "supervised")
        return {
            "id": row["id"],
            "object": "fine_tuning.job",
            "created_at": row["created_at"],
            "error": row["error"],
            "fine_tuned_model": row["fine_tuned_model"],
            "finished_at": row["finished_at"],
            # the top-level field is OpenAI's deprecated one: the supervised three only
            "hyperparameters": {k: hp.get(k, "auto") for k in ("batch_size", "learning_rate_multiplier", "n_epochs")},
            "model": row["model"],
            "organization_id": "local",
            "result_files": row["result_files"],
            "seed": row["seed"],
            "status": row["status"],
            "trained_tokens": row["trained_tokens"],
            "training_file": row["training_file"],
            "validation_file": row["validation_file"],
            "estimated_finish": row["estimated_finish"],
            "integrations": None,
            "metadata": {**(row["metadata"] or {}), "base_model": row["base_model"]},
            "method": {"type": kind, kind: {"hyperparameters": hp}},
        }


def _local_options(flat: Mapping[str, Any]) -> LocalOptions:
    """Local options given as settings keys, checked against their declarations."""
    unknown = sorted(set(flat) - set(LocalOptions.keys()))
    if unknown:
        raise BackendError(f"unknown local training option: {unknown[0]}", code="invalid_config")
    try:
        return LocalOptions.from_settings(flat)
    except ValueError as exc:
        raise BackendError(f"local training option {exc}", code="invalid_config") from None
