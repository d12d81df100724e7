"""``gpt-finetune worker --executor ray``: jobs created through ``serve`` and the official openai
client train as Ray jobs on a real local Ray cluster (``ray start --head``, usage stats off), and
the store stays the source of truth: cancel reaches the Ray job, and a Ray head killed mid-job
and started again leaves the job finished once, never lost nor trained twice. Skipped where Ray
is not installed, unless GPT_FINETUNE_REQUIRE_RAY is set (CI)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import toy_examples
from test_server import Server, free_port, upload, wait_job
from test_workers import WorkerProcess, _env, _wait

try:
    from ray.job_submission import JobSubmissionClient
except ImportError:
    if os.environ.get("GPT_FINETUNE_REQUIRE_RAY"):
        raise
    pytest.skip("Ray is not installed (pip install 'gpt-finetune[ray]')", allow_module_level=True)

RAY = str(Path(sys.executable).parent / "ray")


class Head:
    """One Ray head on free ports (``ray stop`` stops every Ray of this user: the tests' only)."""

    def __init__(self, root: Path) -> None:
        self.port, self.dashboard = free_port(), free_port()
        self.root = root
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")

    def start(self) -> None:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                "--num-cpus",
                "4",
                "--port",
                str(self.port),
                "--dashboard-port",
                str(self.dashboard),
                "--dashboard-host",
                "127.0.0.1",
                "--disable-usage-stats",
            ],
            check=True,
            capture_output=True,
            env=self.env,
            timeout=120,
        )
        _wait("the Ray job API", self._answers, 60)

    def _answers(self) -> bool:
        try:
            JobSubmissionClient(self.address).list_jobs()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=self.env, timeout=120)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = Head(tmp_path_factory.mktemp("ray"))
    h.start()
    yield h
    h.stop()


def _cluster(tmp_path, tiny_model_dir, head):
    env = _env(tiny_model_dir, None)
    env.pop("GPT_FINETUNE_STORE_URL", None)
    home = tmp_path / "home"
    server = Server(home, tiny_model_dir, env={"GPT_FINETUNE_TRAINING_TYPE": "full"})
    worker = WorkerProcess(home, env, "--executor", "ray", "--ray-address", head.address)
    from gpt_finetune.services import Services

    store = Services.open(home)  # the worker holds the runner lock before any job is created
    _wait("the worker's registration", lambda: store.workers.live("worker"), 60, worker)
    return server, worker


class RunnerLog:
    """The automatic runner's log, where the tests show a worker's."""

    def __init__(self, home: Path) -> None:
        self.path = home / "logs" / "runner.log"

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def kill(self) -> None:
        pass  # the server's stop ends it


def test_jobs_train_as_ray_jobs_and_a_cancel_reaches_them(head, tmp_path, tiny_model_dir):
    """No worker started: the runner ``serve`` starts follows ``executor = ray``."""
    home = tmp_path / "home"
    ray_env = {"GPT_FINETUNE_EXECUTOR": "ray", "GPT_FINETUNE_RAY_ADDRESS": head.address}
    server = Server(home, tiny_model_dir, env={"GPT_FINETUNE_TRAINING_TYPE": "full", **ray_env})
    worker = RunnerLog(home)
    try:
        client = server.client()
        train = upload(client, tmp_path, toy_examples(12))
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini", training_file=train.id, hyperparameters={"n_epochs": 1, "batch_size": 4}
        )
        done = wait_job(client, job.id, timeout=300)
        assert done.status == "succeeded", (done.error, worker.text()[-3000:])
        ray = JobSubmissionClient(head.address)
        # the store says succeeded as the process finishes; Ray says so once it has exited
        _wait("the Ray job's end", lambda: ray.get_job_status(f"{job.id}-1").value == "SUCCEEDED", 60, worker)
        from gpt_finetune.services import Services

        log = Services.open(server.home).home.job_dir(job.id) / "train.log"
        _wait(
            "Ray's log in train.log",
            lambda: log.exists() and f"---- Ray job {job.id}-1 ----" in log.read_text(),
            30,
            worker,
        )
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert f"Submitted to the Ray cluster as {job.id}-1" in messages

        long = client.fine_tuning.jobs.create(
            model="gpt-4o-mini", training_file=train.id, hyperparameters={"n_epochs": 50, "batch_size": 1}
        )
        _wait(
            "the long job's training",
            lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id, limit=5).data),
            240,
            worker,
        )
        client.fine_tuning.jobs.cancel(long.id)
        _wait(
            "the Ray job to end",
            lambda: ray.get_job_status(f"{long.id}-1").value in ("STOPPED", "SUCCEEDED", "FAILED"),
            60,
            worker,
        )
        assert wait_job(client, long.id).status == "cancelled"
        assert "training on the Ray cluster at " + head.address in worker.text()
    finally:
        worker.kill()
        server.stop()


def test_a_ray_cluster_out_of_reach_is_said_on_the_waiting_jobs(tmp_path, tiny_model_dir):
    dead = f"http://127.0.0.1:{free_port()}"
    server = Server(
        tmp_path / "home", tiny_model_dir, env={"GPT_FINETUNE_EXECUTOR": "ray", "GPT_FINETUNE_RAY_ADDRESS": dead}
    )
    try:
        client = server.client()
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini", training_file=upload(client, tmp_path, toy_examples(12)).id
        )
        said = _wait(
            "the job's event",
            lambda: [e for e in client.fine_tuning.jobs.list_events(job.id).data if e.message.startswith("Waiting: ")],
            60,
            RunnerLog(server.home),
        )
        assert f"cannot reach the Ray cluster's job API at {dead}" in said[0].message and said[0].level == "warn"
        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"  # waits: nothing lost, nothing faked
    finally:
        server.stop()


def test_a_ray_head_restarted_mid_job_leaves_the_job_finished_once(head, tmp_path, tiny_model_dir):
    server, worker = _cluster(tmp_path, tiny_model_dir, head)
    try:
        client = server.client()
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini",
            training_file=upload(client, tmp_path, toy_examples(16)).id,
            hyperparameters={"n_epochs": 30, "batch_size": 2},  # 240 steps, a checkpoint every 4
        )
        _wait(
            "a checkpoint",
            lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data,
            240,
            worker,
        )
        head.stop()  # the head and its jobs gone, as a head machine lost would
        time.sleep(2)
        head.start()
        done = wait_job(client, job.id, timeout=400)
        assert done.status == "succeeded", (done.error, worker.text()[-3000:])
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert sum(m.startswith("New fine-tuned model created") for m in messages) == 1, messages[:20]
        # `ray stop` kills the training process with the head (a second attempt resumes from the
        # checkpoint), or leaves it running to the end under the worker's lease (one attempt):
        # either way trained to its end once
        attempts = server_row(server, job.id)["attempts"]
        assert attempts in (1, 2), (attempts, worker.text()[-3000:])
        if attempts == 2:
            assert any("the job will resume from its last checkpoint" in m for m in messages)
            ray = JobSubmissionClient(head.address)
            _wait("the Ray job's end", lambda: ray.get_job_status(f"{job.id}-2").value == "SUCCEEDED", 60, worker)
        steps = [
            e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type == "metrics"
        ]
        assert max(steps) == 240
    finally:
        worker.kill()
        server.stop()


def server_row(server: Server, job_id: str) -> dict:
    from gpt_finetune.services import Services

    return Services.open(server.home).jobs.row(job_id)


def test_a_job_on_two_processes_trains_across_two_ray_workers_as_one_process_does(head, tmp_path, tiny_model_dir):
    """Data-parallel on Ray (Ray Train, two workers on CPU with gloo) against one process on
    Ray: the same steps, losses and adapter weights, as tests/test_distributed.py checks for
    two processes on one machine."""
    from test_distributed import assert_same_training, run_job

    from gpt_finetune.services import Services

    home = tmp_path / "home"
    worker = WorkerProcess(home, _env(tiny_model_dir, None), "--executor", "ray", "--ray-address", head.address)
    try:
        store = Services.open(home)
        _wait("the worker's registration", lambda: store.workers.live("worker"), 60, worker)
        one_dir, one_metrics, _ = run_job(home, tmp_path, tiny_model_dir, 1)
        two_dir, two_metrics, two_started = run_job(home, tmp_path, tiny_model_dir, 2)
        assert "on cpu x2 (" in two_started
        jobs = [row["id"] for row in store.store.query("SELECT id FROM jobs ORDER BY created_at")]
        info = JobSubmissionClient(head.address).get_job_info(f"{jobs[1]}-1")
        assert "gpt_finetune.worker.ray_train --processes 2" in info.entrypoint
        assert_same_training(one_dir, one_metrics, two_dir, two_metrics)
    finally:
        worker.kill()
