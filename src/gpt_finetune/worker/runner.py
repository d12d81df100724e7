"""Workers: processes that claim queued jobs and train them, one at a time each.

Two kinds, one loop (``Worker``):

- the **runner**, started by ``worker.launch.start_runner`` (through ``JobService.kick``) whenever
  jobs wait and no runner holds the store's runner lock; it exits when the queue is empty. The
  default single-machine set-up has only this one.
- a **worker** started by hand (``gpt-finetune worker``) on any machine that reaches the store and
  the data directory; it runs until told to stop (SIGTERM or SIGINT: its job goes back to the
  queue, to resume from its last checkpoint elsewhere). On the data directory's own SQLite store
  it is the one runner (it holds the runner lock); on a shared store (PostgreSQL) any number run,
  each claiming jobs that fit what it declared (GPUs, memory).

A claimed job is held under a lease the worker renews every third of it, from a thread of its
own, so that a store that is slow to answer (a PostgreSQL restart waited out) never delays the
loop that watches the training process. A worker that cannot renew its lease for most of a lease
period stops training (kills the process) rather than train beside the worker that may by then
have taken the job; one that finds the job held by another worker stops at once. A worker or
machine that dies leaves a lease that lapses; any live worker then requeues the job from its last
checkpoint (``JobService.recover_orphans``), or fails it after the retry limit.

Each job trains in a child process of its own (``worker.train_job``, through ``accelerate launch``
when ``num_processes`` > 1), so a job's memory is freed when it ends, and a cancelled job that
does not stop within ``CANCEL_GRACE`` seconds is killed (a paused one within ``PAUSE_GRACE``: it
saves a checkpoint first). The child dies with its worker (PR_SET_PDEATHSIG on Linux; it also
polls the worker's pid), and stops when the store says another worker holds its job.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from ..contract import JobSpec, JobStatus
from ..errors import ConfigError, GptFinetuneError, StoreError
from ..services import Services
from ..services.jobs import LEASE_SECONDS
from ..settings import from_env
from .allocator import allocator_env

CANCEL_GRACE = 10.0
PAUSE_GRACE = 120.0  # a paused job saves a checkpoint before it stops
POLL_SECONDS = 1.0  # how often an idle worker on a shared store looks for work
STORE_RETRY_SECONDS = 5.0  # how long a worker waits for a shared store out of reach
FENCE_SHARE = 0.8  # of the lease: unrenewed this long, a worker stops training its job
log = logging.getLogger("gpt_finetune.runner")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the child polls the runner's pid instead


def capabilities(gpus: int | None = None, memory_gb: float | None = None) -> tuple[int, float]:
    """What this machine can train, where the worker's flags do not say: its CUDA devices, and
    the memory a job's plan is made against (the smallest device's, or the memory the machine
    has available now)."""
    from ..local.machine import available_bytes

    if gpus is not None and memory_gb is not None:
        return gpus, round(memory_gb, 2)
    found_gpus, device_gb = 0, None
    try:
        import torch

        if torch.cuda.is_available():
            found_gpus = torch.cuda.device_count()
            device_gb = min(torch.cuda.get_device_properties(i).total_memory for i in range(found_gpus)) / 1e9
    except ImportError:  # a worker without the [local] extra cannot train; its jobs say why
        pass
    gpus = found_gpus if gpus is None else gpus
    if memory_gb is None:
        memory_gb = device_gb if gpus and device_gb else (available_bytes() or 0) / 1e9
    return gpus, round(memory_gb, 2)


def train_job_args(services: Services, job: dict[str, Any], worker_id: str | None = None) -> list[str]:
    """The training process's arguments (``worker.train_job``), whoever starts it."""
    args = ["--home", str(services.home.root)]
    if worker_id:
        args += ["--worker-id", worker_id, "--attempt", str(job["attempts"])]
    return [*args, job["id"]]


def child_command(services: Services, job: dict[str, Any], worker_id: str | None = None) -> list[str]:
    args = ["--runner-pid", str(os.getpid()), *train_job_args(services, job, worker_id)]
    n = JobSpec.from_row(job).local.run.num_processes
    if n > 1:
        # the launcher as a module of this interpreter: works whether or not the venv is on PATH
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(n),
            "--num_machines",
            "1",
            "-m",
            "gpt_finetune.worker.train_job",
            *args,
        ]
    return [sys.executable, "-m", "gpt_finetune.worker.train_job", *args]


class Watch:
    """One training's stop state: when a cancelled or paused job is stopped, and why it stopped."""

    def __init__(self) -> None:
        self.stop_by: float | None = None
        self.why = ""


def _gpus(n: int) -> str:
    return "no GPU" if not n else "1 GPU" if n == 1 else f"{n} GPUs"


class Worker:
    """One worker's loop: register, claim, train, beat, and say so when it stops."""

    filters_claims = True  # claims only jobs that fit what it declared (a Ray worker: Ray schedules)

    def __init__(
        self,
        services: Services,
        *,
        kind: str = "runner",
        gpus: int | None = None,
        memory_gb: float | None = None,
        lease_seconds: int = LEASE_SECONDS,
        malloc: str | None = None,
        metrics_url: str | None = None,
    ) -> None:
        self.services = services
        self.jobs = services.jobs
        self.jobs.lease_seconds = max(int(lease_seconds), 2)
        self.kind = kind
        self.gpus, self.memory_gb = capabilities(gpus, memory_gb)
        self.malloc = malloc
        self.metrics_url = metrics_url
        self.id: str | None = None
        self.job_id: str | None = None  # the job it trains now
        self.stopping = threading.Event()  # SIGTERM/SIGINT: hand the job back and leave
        self.renewed = time.monotonic()  # when the store last answered for the lease (or the claim)
        self.lost = False  # the store says another worker holds the job (or it is no longer running)
        self.job_status: JobStatus | None = None  # the job's status as the heartbeat thread last read it
        self.trained_tokens = 0
        self.jobs_done = 0
        self.jobs_released = 0  # handed back when told to stop
        self.renewals = 0
        self.renewal_failures = 0  # the store did not answer, or the job was not this worker's any more
        self._told_waiting: set[str] = set()

    @property
    def lease_seconds(self) -> int:
        return self.jobs.lease_seconds

    def describe(self) -> str:
        return f"{_gpus(self.gpus)}, {self.memory_gb:g} GB for training, lease {self.lease_seconds} s"

    # ---- the loop -----------------------------------------------------------------------
    def run(self, *, exit_when_idle: bool) -> int:
        self.id = self.services.workers.register(
            kind=self.kind,
            gpus=self.gpus,
            memory_gb=self.memory_gb,
            lease_seconds=self.lease_seconds,
            metrics_url=self.metrics_url,
        )
        log.info("%s %s started (%s) on the store %s", self.kind, self.id, self.describe(), self.services.store)
        beater = threading.Thread(target=self._beat, name="lease", daemon=True)
        beater.start()
        try:
            return self._loop(exit_when_idle)
        finally:
            self.stopping.set()
            try:
                self.services.workers.stopped(self.id)
            except GptFinetuneError as exc:  # the store is gone too: the heartbeat's absence says it
                log.warning("could not record the stop: %s", exc)
            log.info("%s %s stopped", self.kind, self.id)

    def _loop(self, exit_when_idle: bool) -> int:
        jobs, shared = self.jobs, self.jobs.store.shared
        jobs.recover_orphans(startup=not shared)
        # on the data directory's own store this is the only worker there is: it takes every job,
        # and one that cannot train here fails with the reason rather than wait for ever
        gpus, memory_gb = (self.gpus, self.memory_gb) if shared and self.filters_claims else (None, None)
        while not self.stopping.is_set():
            try:
                job = jobs.claim_next(os.getpid(), worker_id=self.id, gpus=gpus, memory_gb=memory_gb)
                if job is not None:
                    log.info("training %s (attempt %s)", job["id"], job["attempts"])
                    try:
                        self.run_job(job)
                    except StoreError:
                        raise  # the store's, not the job's: waited out below
                    except Exception as exc:  # an OSError on a full disk, a bug: this job's, not the worker's
                        self._job_broke(job, exc)
                        self.stopping.wait(POLL_SECONDS)  # a fault that repeats does not spin
                    continue
                if shared:
                    # other machines' workers may hold running jobs: take over any whose lease lapses
                    jobs.recover_orphans(startup=False)
                    if self.filters_claims:
                        self._tell_waiting()
                if exit_when_idle and not (shared and jobs.has_active()):
                    return 0
            except StoreError as exc:
                if not shared:
                    raise  # the data directory's own file: nothing to wait out
                # a shared store out of reach for longer than its own retries (a database
                # restarted, a network down): the worker waits it out rather than exit, and its
                # jobs' leases lapse meanwhile, as the store's side sees it
                log.warning("the store is out of reach (%s); trying again in %g s", exc.message, STORE_RETRY_SECONDS)
                self.stopping.wait(STORE_RETRY_SECONDS)
                continue
            self.stopping.wait(POLL_SECONDS)
        return 0

    def _job_broke(self, job: dict[str, Any], exc: Exception) -> None:
        """Running a job failed in the worker itself (its log could not be opened, its process
        not started): the job is queued again or, past its attempts, failed with the reason,
        and the worker goes on with the next one instead of ending with a traceback."""
        self.job_id = None
        log.exception("could not run %s", job["id"])
        row = self.jobs.row(job["id"])
        if row["status"] == JobStatus.RUNNING and row.get("worker_id") in (None, self.id):
            what = f"the worker could not run it ({type(exc).__name__}: {exc})"
            self.jobs.requeue_or_fail(row, what, str(self.services.home.job_dir(job["id"]) / "train.log"))

    def _tell_waiting(self) -> None:
        """A queued job no live worker can take says so once in its events, with what it needs."""
        waiting = [
            r for r in self.jobs.waiting_for_a_worker(self.gpus, self.memory_gb) if r["id"] not in self._told_waiting
        ]
        live = self.services.workers.live() if waiting else []
        for row in waiting:
            gpus, mem = row["need_gpus"] or 0, row["need_memory_gb"]
            fits = [w for w in live if w["gpus"] >= gpus and (mem is None or w["memory_gb"] >= mem)]
            if fits:
                continue
            self._told_waiting.add(row["id"])
            needs = ", ".join(
                p for p in (_gpus(gpus) if gpus else "", f"{mem:g} GB for its memory plan" if mem else "") if p
            )
            have = "; ".join(f"{w['id']}: {_gpus(w['gpus'])}, {w['memory_gb']:g} GB" for w in live) or "none"
            self.jobs.event(row["id"], f"Waiting for a worker with {needs} (live workers: {have})", level="warn")

    def _beat(self) -> None:
        """The store-facing thread: the worker's row every third of the lease, the lease of the
        job it trains with it, and the job's status twice a second (what the training loop acts
        on). The loop itself never waits on the store. While it trains, it also takes over the
        jobs of lost workers once a lease (idle, the loop does it): with every worker busy, a lost
        worker's job is still requeued within about a lease of its lapse, at its place in the queue."""
        last_beat = last_recovery = 0.0
        shared = self.jobs.store.shared
        while not self.stopping.wait(0.5):
            job_id = self.job_id
            try:
                if job_id is not None:
                    self.job_status = self.jobs.status(job_id)
                if time.monotonic() - last_beat < max(self.lease_seconds / 3, 0.5):
                    continue
                last_beat = time.monotonic()
                if job_id is not None:
                    asked = time.monotonic()  # the lease runs from no later than this
                    if self.jobs.renew_lease(job_id, self.id):
                        self.renewals += 1
                    else:
                        row = self.jobs.row(job_id)
                        # still running, but not under this worker's lease: another worker took
                        # it. Otherwise it stopped (cancelled, paused, finished): the loop
                        # follows its status, and there is no lease left to hold
                        if row["status"] == JobStatus.RUNNING and row["worker_id"] != self.id and job_id == self.job_id:
                            self.renewal_failures += 1
                            self.lost = True
                    self.renewed = asked  # the store answered
                self.services.workers.beat(self.id or "", job_id)
                if shared and job_id is not None and time.monotonic() - last_recovery >= self.lease_seconds:
                    last_recovery = time.monotonic()
                    self.jobs.recover_orphans(startup=False)
            except GptFinetuneError as exc:  # the store is unreachable past its retries: fenced below
                self.renewal_failures += 1
                log.warning("heartbeat failed: %s", exc)

    def run_job(self, job: dict[str, Any]) -> None:
        jobs, services = self.jobs, self.services
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(allocator_env(env, self.malloc))  # tcmalloc/jemalloc when installed: faster steps, lower peak
        env.update(services.store.environment())  # the store's URL where a flag gave it
        if services.home.model_cache is not None:
            env["GPT_FINETUNE_MODEL_CACHE"] = str(services.home.model_cache)
        log_path = services.home.job_dir(job["id"])
        log_path.mkdir(parents=True, exist_ok=True)
        self.renewed, self.lost, self.job_status, self.job_id = time.monotonic(), False, None, job["id"]
        with open(log_path / "train.log", "ab") as out:
            child = subprocess.Popen(
                child_command(services, job, self.id),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                preexec_fn=_die_with_parent,
                start_new_session=False,
            )
            watch = Watch()
            while child.poll() is None:
                time.sleep(0.5)
                if self.should_stop(watch):
                    break
            if child.poll() is None:
                child.kill()
            child.wait()
        self.job_id = None
        if self.settled(job, watch.why):
            return
        row = jobs.row(job["id"])
        if row["status"] == JobStatus.RUNNING and row.get("worker_id") in (None, self.id):
            # the child died without finishing the job
            if child.returncode and child.returncode < 0:
                jobs.event(job["id"], f"The training process was killed by signal {-child.returncode}", level="warn")
            jobs.requeue_or_fail(
                row, f"the training process exited with code {child.returncode}", str(log_path / "train.log")
            )
        self.count(row)

    # ---- what every executor shares -----------------------------------------------------
    def should_stop(self, watch: Watch) -> bool:
        """Whether to stop the training of the current job now; ``watch.why`` says why (empty:
        cancelled or paused, past its grace period)."""
        if self.stopping.is_set():
            watch.why = f"Worker {self.id} is shutting down"
            return True
        # on a shared store only: on the data directory's own, the runner lock already proves no
        # other worker can hold the job
        fenced = self.jobs.store.shared and time.monotonic() - self.renewed > FENCE_SHARE * self.lease_seconds
        if self.lost or fenced:
            watch.why = "lost" if self.lost else "unrenewed"
            return True
        status = self.job_status
        if status in (JobStatus.CANCELLED, JobStatus.PAUSED) and watch.stop_by is None:
            watch.stop_by = time.time() + (CANCEL_GRACE if status == JobStatus.CANCELLED else PAUSE_GRACE)
        return watch.stop_by is not None and time.time() > watch.stop_by

    def settled(self, job: dict[str, Any], why: str) -> bool:
        """After a stop for ``why``: a job handed back (shutdown) or no longer this worker's
        (lost, unrenewed) needs nothing more (True)."""
        if why.startswith("Worker"):  # hand the job back: another worker resumes it
            if self.jobs.release(job["id"], self.id or "", why):
                self.jobs_released += 1
                log.info("handed %s back to the queue", job["id"])
            return True
        if why:
            log.warning(
                "stopped training %s: %s",
                job["id"],
                "another worker holds it now"
                if why == "lost"
                else f"its lease could not be renewed for {FENCE_SHARE * self.lease_seconds:.0f} s",
            )
            return True  # not ours any more: whoever holds it (or recovers it) decides
        return False

    def count(self, row: dict[str, Any]) -> None:
        """A job that ended succeeded counts in this worker's figures."""
        if row["status"] == JobStatus.SUCCEEDED:
            self.jobs_done += 1
            self.trained_tokens += int(row["trained_tokens"] or 0)
            self.services.workers.job_done(self.id or "", int(row["trained_tokens"] or 0))


def worker_registry(worker: Worker) -> Any:
    """A Prometheus registry of one worker's figures, read from it at each scrape (the store's
    figures, for every worker, are the server's ``/metrics``)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    class Collector:
        def collect(self) -> Any:
            w = worker
            yield InfoMetricFamily(
                "gpt_finetune_worker",
                "this worker",
                value={"id": w.id or "", "kind": w.kind, "hostname": os.uname()[1]},
            )
            yield GaugeMetricFamily(
                "gpt_finetune_worker_busy", "1 while it trains a job", value=int(w.job_id is not None)
            )
            yield GaugeMetricFamily("gpt_finetune_worker_gpus", "GPUs it declared", value=w.gpus)
            yield GaugeMetricFamily(
                "gpt_finetune_worker_memory_bytes", "memory it declared for jobs' plans", value=w.memory_gb * 1e9
            )
            yield GaugeMetricFamily("gpt_finetune_worker_lease_seconds", "its lease", value=w.lease_seconds)
            for name, text, value in (
                ("jobs_succeeded", "jobs it trained to the end", w.jobs_done),
                ("jobs_released", "jobs it handed back when told to stop", w.jobs_released),
                ("tokens_trained", "tokens of the jobs it trained to the end", w.trained_tokens),
                ("lease_renewals", "lease renewals", w.renewals),
                ("lease_renewal_failures", "lease renewals the store refused or did not answer", w.renewal_failures),
            ):
                yield CounterMetricFamily(f"gpt_finetune_worker_{name}", text, value=value)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    return registry


def _runner(services: Services, malloc: str | None) -> Worker:
    """The automatic runner's worker: training in its own processes, or on the Ray cluster
    when ``executor = ray`` (the setting reaches it through the environment the launcher gave)."""
    if from_env("executor") != "ray":
        return Worker(services, kind="runner", malloc=malloc)
    from .ray_executor import RayWorker

    address = from_env("ray_address") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("executor ray needs the cluster's address", hint="set ray_address = http://HEAD:8265")
    return RayWorker(
        services, kind="runner", ray_address=address, ray_gpus=from_env("ray_gpus") or 0, gpus=0, memory_gb=0.0
    )


def main(argv: list[str] | None = None) -> int:
    """The auto-started runner (``worker.launch``)."""
    ap = argparse.ArgumentParser(prog="gpt_finetune.worker.runner")
    ap.add_argument("--home", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s runner[%(process)d] %(message)s")
    # what the user set for training, from the environment the launcher gave (settings.from_env)
    malloc = from_env("malloc")
    services = Services.open(args.home)
    lock = services.jobs.runner_lock()
    while True:
        if not lock.acquire():
            return 0  # another runner is alive (for a PostgreSQL store: on any machine)
        try:
            worker = _runner(services, malloc)
        except GptFinetuneError as exc:  # executor = ray and no cluster: the queued jobs say why
            log.error("%s", exc.message)
            services.jobs.validate_pending(os.getpid())  # checked as a worker would: failed or queued
            services.jobs.note_queued(f"Waiting: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
            lock.release()
            return 1
        worker.run(exit_when_idle=True)
        # nothing queued: let go, then look once more, so a job queued meanwhile is not stranded
        lock.release()
        if not services.jobs.has_active():
            return 0


if __name__ == "__main__":
    sys.exit(main())
