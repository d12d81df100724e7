"""The training runner: a detached process that trains queued jobs one at a time.

Started by ``worker.launch.start_runner`` (through ``JobService.kick``) whenever jobs wait and no runner holds ``runner.lock``; exits when
the queue is empty. Each job trains in a child process of its own (``worker.train_job``, through
``accelerate launch`` when ``num_processes`` > 1), so a job's memory is freed when it ends, and a
cancelled job that does not stop within ``CANCEL_GRACE`` seconds is killed (a paused one
within ``PAUSE_GRACE``: it saves a checkpoint first). The child dies with
the runner (PR_SET_PDEATHSIG on Linux; it also polls the runner's pid), so a job never trains
twice at once.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ..contract import JobSpec, JobStatus
from ..services import Services
from ..services.jobs import LEASE_SECONDS
from ..settings import from_env
from .allocator import allocator_env

CANCEL_GRACE = 10.0
PAUSE_GRACE = 120.0  # a paused job saves a checkpoint before it stops
log = logging.getLogger("gpt_finetune.runner")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the child polls the runner's pid instead


def child_command(services: Services, job: dict[str, Any]) -> list[str]:
    args = ["--home", str(services.home.root), "--runner-pid", str(os.getpid()), job["id"]]
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


def run_job(services: Services, job: dict[str, Any], malloc: str | None = None) -> None:
    jobs = services.jobs
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(allocator_env(env, malloc))  # tcmalloc/jemalloc when installed: faster steps, lower peak
    log_path = services.home.job_dir(job["id"])
    log_path.mkdir(parents=True, exist_ok=True)
    with open(log_path / "train.log", "ab") as out:
        child = subprocess.Popen(
            child_command(services, job),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            preexec_fn=_die_with_parent,
            start_new_session=False,
        )
        stop_by: float | None = None  # when a cancelled or paused job's process is killed
        renewed = time.monotonic()
        while child.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - renewed > LEASE_SECONDS / 3:
                jobs.renew_lease(job["id"])
                renewed = time.monotonic()
            status = jobs.status(job["id"])
            if status in (JobStatus.CANCELLED, JobStatus.PAUSED) and stop_by is None:
                stop_by = time.time() + (CANCEL_GRACE if status == JobStatus.CANCELLED else PAUSE_GRACE)
            if stop_by is not None and time.time() > stop_by:
                child.kill()
                child.wait()
    row = jobs.row(job["id"])
    if row["status"] == JobStatus.RUNNING:  # the child died without finishing the job
        if child.returncode and child.returncode < 0:
            jobs.event(job["id"], f"The training process was killed by signal {-child.returncode}", level="warn")
        jobs.requeue_or_fail(
            row, f"the training process exited with code {child.returncode}", str(log_path / "train.log")
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpt_finetune.worker.runner")
    ap.add_argument("--home", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s runner[%(process)d] %(message)s")
    # what the user set for training, from the environment the launcher gave (settings.from_env)
    malloc = from_env("malloc")
    services = Services.open(args.home)
    lock = services.jobs.runner_lock()
    if not lock.acquire():
        return 0  # another runner is alive (for a PostgreSQL store: on any machine)
    log.info("runner started")
    services.jobs.recover_orphans()
    while True:
        job = services.jobs.claim_next(os.getpid())
        if job is not None:
            log.info("training %s (attempt %s)", job["id"], job["attempts"])
            run_job(services, job, malloc)
            continue
        if services.jobs.store.shared and services.jobs.has_active():
            # a shared store: other machines' runners may hold running jobs; take over any whose
            # lease lapses, and look again shortly instead of spinning
            services.jobs.recover_orphans(startup=False)
            time.sleep(1.0)
        # nothing queued: let go, then look once more, so a job queued meanwhile is not stranded
        lock.release()
        if not services.jobs.has_active() or not lock.acquire():
            log.info("runner done")
            return 0


if __name__ == "__main__":
    sys.exit(main())
