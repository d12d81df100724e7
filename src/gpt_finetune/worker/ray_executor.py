"""Jobs trained on a Ray cluster (``executor = ray``, README "Training on a Ray cluster").

A ``RayWorker`` is a worker (``worker.runner.Worker``: the same claims, lease, heartbeat,
recovery and fencing) whose jobs train as Ray jobs rather than as its own child processes: it
submits the job's training process (``worker.train_job``, the same command) through Ray's job
submission API, asking Ray for what the job needs (its GPUs, its memory plan's peak), and follows
it. The store stays the source of truth: the Ray job only trains and writes the job's events,
checkpoints and model as a local training process does, and the worker holds the lease.

- **Never twice.** The submission id is ``<job id>-<attempt>``: Ray refuses a second submission of
  one id, so a worker that restarts and claims the same attempt follows the Ray job it finds
  rather than start another; a resumed attempt (a new number) is a new submission. The training
  process also stops as soon as the store says its worker no longer holds the job.
- **Cancel, pause, shutdown** reach the Ray job: the training process sees the status and stops
  (a paused one after its checkpoint); one that does not within the grace is stopped through Ray
  (``stop_job``), as a local one would be killed.
- **The Ray head restarted** (its jobs gone with it): the worker finds the submission unknown or
  failed and requeues the job from its last checkpoint, or fails it after the retry limit,
  exactly as when a local training process dies. While the head does not answer the worker keeps
  the lease and waits (the training may go on on its node).
- **Logs**: Ray's log of the job is appended to the job's ``train.log`` when it ends.

- **Data-parallel**: a job with ``num_processes`` > 1 trains as a Ray Train run of that many
  workers, on whichever nodes have room (``worker.ray_train``), each running the job's training
  process at its rank; one process trains as the Ray job's entrypoint itself.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from typing import Any

from ..contract import JobSpec, JobStatus
from ..errors import ConfigError, DependencyError
from .runner import Watch, Worker, train_job_args

log = logging.getLogger("gpt_finetune.runner")
POLL_SECONDS = 1.0
RAY_DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def submission_id(job: dict[str, Any]) -> str:
    return f"{job['id']}-{job['attempts']}"


class RayWorker(Worker):
    filters_claims = False  # Ray places each job on a node that has what it asks for, or holds it

    def __init__(self, services: Any, *, ray_address: str, ray_gpus: int = 0, **kw: Any) -> None:
        super().__init__(services, **kw)
        self.ray_gpus = ray_gpus  # GPUs each training process asks Ray for (--ray-gpus; 0: CPU)
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise DependencyError(
                "executor = ray needs Ray's job client", hint="pip install 'gpt-finetune[ray]'"
            ) from None
        self.ray_address = ray_address
        try:
            self.client = JobSubmissionClient(ray_address)
        except Exception as exc:  # refused, unresolvable, not a Ray head: whatever requests raises
            raise ConfigError(
                f"cannot reach the Ray cluster's job API at {ray_address}: {type(exc).__name__}",
                hint="the head's job API is http://HEAD:8265, its dashboard port (--ray-address, or ray_address = ...)",
            ) from None

    def describe(self) -> str:
        return f"{super().describe()}, training on the Ray cluster at {self.ray_address}"

    def _status(self, sid: str) -> str | None:
        """The Ray job's status, None when Ray does not know it, "" when Ray does not answer."""
        try:
            return str(self.client.get_job_status(sid).value)
        except RuntimeError as exc:  # the job server's 404 (a head restarted without it) or 500
            return None if "does not exist" in str(exc) or "404" in str(exc) else ""
        except Exception:  # connection refused, timed out: the head is down
            return ""

    def command(self, job: dict[str, Any], sid: str) -> tuple[list[str], dict[str, Any]]:
        """The Ray job's entrypoint and what it asks Ray for. One process: the training process
        itself, on a node with a CPU, ``--ray-gpus`` GPUs and its memory plan's peak. Several
        (``num_processes``): a Ray Train run (``worker.ray_train``) of that many workers, each
        asking for that much; its driver, which only waits, asks for nothing. No --runner-pid:
        the training process is Ray's child, not this worker's."""
        args = train_job_args(self.services, job, self.id)
        n = JobSpec.from_row(job).local.run.num_processes
        memory_gb = float(job.get("need_memory_gb") or 0)
        if n > 1:
            storage = self.services.home.job_dir(job["id"]) / "ray"  # the shared data directory
            driver = [sys.executable, "-m", "gpt_finetune.worker.ray_train", "--processes", str(n)]
            driver += ["--gpus", str(self.ray_gpus), "--memory-gb", str(memory_gb)]
            driver += ["--name", sid, "--storage", str(storage), "--", *args]
            return driver, {"entrypoint_num_cpus": 0}
        resources: dict[str, Any] = {"entrypoint_num_cpus": 1}
        if self.ray_gpus:
            resources["entrypoint_num_gpus"] = self.ray_gpus
        if memory_gb:
            resources["entrypoint_memory"] = int(memory_gb * 1e9)
        return [sys.executable, "-m", "gpt_finetune.worker.train_job", *args], resources

    def _submit(self, job: dict[str, Any], sid: str) -> None:
        services = self.services
        command, resources = self.command(job, sid)
        env = dict(services.store.environment())
        if services.home.model_cache is not None:
            env["GPT_FINETUNE_MODEL_CACHE"] = str(services.home.model_cache)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            self.client.submit_job(
                entrypoint=shlex.join(command),
                submission_id=sid,
                runtime_env={"env_vars": env},
                metadata={"gpt_finetune_job": job["id"], "worker": self.id or ""},
                **resources,
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
            log.info("%s was submitted before (this attempt's Ray job already exists): following it", sid)

    def run_job(self, job: dict[str, Any]) -> None:
        jobs, services = self.jobs, self.services
        sid = submission_id(job)
        log_path = services.home.job_dir(job["id"])
        log_path.mkdir(parents=True, exist_ok=True)
        self.renewed, self.lost, self.job_status, self.job_id = time.monotonic(), False, None, job["id"]
        try:
            self._submit(job, sid)
        except Exception as exc:  # the head is unreachable or refused it: back to the queue
            self.job_id = None
            jobs.requeue_or_fail(jobs.row(job["id"]), f"Ray refused the job ({exc})", str(log_path / "train.log"))
            return
        jobs.event(job["id"], f"Submitted to the Ray cluster as {sid}")
        watch = Watch()
        ray_status: str | None = ""
        while True:
            time.sleep(POLL_SECONDS)
            ray_status = self._status(sid)
            if ray_status is None or ray_status in RAY_DONE or self.should_stop(watch):
                break
        if ray_status not in RAY_DONE and ray_status is not None:
            try:
                self.client.stop_job(sid)
            except Exception as exc:  # the head is down: the training process stops when it sees the store
                log.warning("could not stop the Ray job %s: %s", sid, exc)
        self._keep_logs(sid, log_path / "train.log")
        self.job_id = None
        if self.settled(job, watch.why):
            return
        row = jobs.row(job["id"])
        if row["status"] == JobStatus.RUNNING and row.get("worker_id") in (None, self.id):
            what = "the Ray cluster lost the job" if ray_status is None else f"the Ray job ended {ray_status}"
            jobs.requeue_or_fail(row, what, str(log_path / "train.log"))
        self.count(row)

    def _keep_logs(self, sid: str, path: Any) -> None:
        try:
            text = self.client.get_job_logs(sid)
        except Exception:
            return
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"---- Ray job {sid} ----\n{text}")
