"""Workers under leases (README "Several machines"): what a worker may claim, what a stale one may
no longer touch, and, end to end on a real PostgreSQL, ``gpt-finetune worker`` processes sharing
one queue with ``serve`` and the official ``openai`` client: every job trained once, a worker told
to stop handing its job back, a killed one's job resumed by another from its checkpoint, metrics
and the listing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, toy_examples, write_jsonl

from gpt_finetune.services import Services

pytest.importorskip("psycopg")
LEASE = 3  # seconds: short, so a lost worker's job is taken over quickly


@pytest.fixture(params=["sqlite", "postgresql"])
def services(request, tmp_path):
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return Services.open(tmp_path / "home", store_url=url)


def _queued(s: Services, chat_file: Path, n: int) -> list[str]:
    file_id = s.files.create_from_path(chat_file)["id"]
    ids = [s.jobs.create(model="gpt-4o-mini", training_file=file_id, start=False)["id"] for _ in range(n)]
    s.jobs.validate_pending(os.getpid())  # queued, as a worker's claim would leave them
    assert {s.jobs.status(i) for i in ids} == {"queued"}
    return ids


def test_a_worker_claims_only_the_jobs_that_fit_what_it_declared(services, chat_file):
    s = services
    small, big, multi = _queued(s, chat_file, 3)
    s.store.execute("UPDATE jobs SET need_memory_gb = 40 WHERE id = ?", (big,))
    s.store.execute("UPDATE jobs SET need_gpus = 2 WHERE id = ?", (multi,))
    waiting = {r["id"] for r in s.jobs.waiting_for_a_worker(0, 16.0)}
    assert waiting == {big, multi}
    assert s.jobs.claim_next(1, worker_id="cpu", gpus=0, memory_gb=16.0)["id"] == small
    assert s.jobs.claim_next(1, worker_id="cpu", gpus=0, memory_gb=16.0) is None  # the others wait
    assert s.jobs.claim_next(2, worker_id="one-gpu", gpus=1, memory_gb=80.0)["id"] == big
    row = s.jobs.claim_next(3, worker_id="two-gpus", gpus=2, memory_gb=24.0)
    assert row["id"] == multi and row["worker_id"] == "two-gpus" and row["lease_until"] > time.time()


def test_a_plan_records_the_memory_a_resumed_job_needs(services, chat_file):
    s = services
    (job,) = _queued(s, chat_file, 1)
    s.jobs.set_plan(job, {"estimated_peak_bytes": 3_210_000_001, "budget_bytes": 1})
    assert s.jobs.row(job)["need_memory_gb"] == pytest.approx(3.22)
    assert s.jobs.claim_next(1, gpus=0, memory_gb=3.2) is None
    assert s.jobs.claim_next(1, gpus=0, memory_gb=3.22)["id"] == job


def test_a_worker_whose_lease_lapsed_can_no_longer_touch_the_job_another_took(services, chat_file):
    s = services
    (job,) = _queued(s, chat_file, 1)
    first = s.jobs.claim_next(1, worker_id="a")
    assert s.jobs.holds(job, "a") and s.jobs.renew_lease(job, "a")
    s.store.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (int(time.time()) - 1, job))
    assert s.jobs.recover_orphans(startup=False) == [job]  # a lapsed lease: any worker requeues it
    second = s.jobs.claim_next(2, worker_id="b")
    assert second["id"] == job and second["attempts"] == 2
    # worker a comes back (a network partition healed): it holds nothing and moves nothing
    assert not s.jobs.holds(job, "a") and not s.jobs.renew_lease(job, "a")
    assert not s.jobs.requeue_or_fail(first, "the training process exited with code 1", "log")
    assert not s.jobs.release(job, "a", "Worker a is shutting down")
    row = s.jobs.row(job)
    assert (row["status"], row["worker_id"], row["attempts"]) == ("running", "b", 2)
    assert s.jobs.holds(job, "b") and s.jobs.renew_lease(job, "b")
    # a training process of an earlier attempt by the same worker (one that outlived a Ray head,
    # say) holds nothing and completes nothing
    assert s.jobs.holds(job, "b", attempt=2) and not s.jobs.holds(job, "b", attempt=1)
    assert not s.jobs.succeed(job, held_by="b", attempt=1) and s.jobs.status(job) == "running"
    assert s.jobs.succeed(job, held_by="b", attempt=2) and s.jobs.status(job) == "succeeded"


def test_a_worker_told_to_stop_hands_its_job_back_without_spending_an_attempt(services, chat_file):
    s = services
    (job,) = _queued(s, chat_file, 1)
    s.jobs.claim_next(1, worker_id="a")
    assert s.jobs.release(job, "a", "Worker a is shutting down")
    row = s.jobs.row(job)
    assert (row["status"], row["worker_id"], row["attempts"]) == ("queued", None, 0)
    messages = [e["message"] for e in s.jobs.list_events(job)[0]]
    assert "Worker a is shutting down; the job will start over (it had no checkpoint yet)" in messages


def test_the_details_of_a_job_whose_plan_an_older_release_made_still_answer(services, chat_file):
    s = services
    (job,) = _queued(s, chat_file, 1)
    s.store.update("jobs", job, {"plan": {"micro_batch_tokens": 512}})  # fields added since are missing
    details = s.jobs.details(job)
    assert details["plan"] == {"micro_batch_tokens": 512} and details["plan_summary"] is None


def test_a_file_check_cut_short_on_a_shared_store_is_done_again_once_its_lease_lapses(pg_url, tmp_path, chat_file):
    s = Services.open(tmp_path / "home", store_url=pg_url)
    file_id = s.files.create_from_path(chat_file)["id"]
    job = s.jobs.create(model="gpt-4o-mini", training_file=file_id, start=False)["id"]
    # a worker on another machine took the check, then died: its lease still runs
    s.store.execute("UPDATE jobs SET worker_pid = 999999, lease_until = ? WHERE id = ?", (int(time.time()) + 60, job))
    s.jobs.recover_orphans(startup=False)
    assert s.jobs.validate_pending(1) == []  # still its check
    s.store.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (int(time.time()) - 1, job))
    s.jobs.recover_orphans(startup=False)
    assert s.jobs.validate_pending(1) == [job] and s.jobs.status(job) == "queued"


def test_the_listing_tells_busy_idle_stopped_and_lost_workers_apart(services):
    w = services.workers
    busy = w.register(kind="worker", gpus=1, memory_gb=80, lease_seconds=LEASE)
    idle = w.register(kind="runner", gpus=0, memory_gb=8, lease_seconds=LEASE)
    gone = w.register(kind="worker", gpus=0, memory_gb=8, lease_seconds=LEASE)
    lost = w.register(kind="worker", gpus=0, memory_gb=8, lease_seconds=LEASE)
    w.beat(busy, "ftjob-x")
    w.stopped(gone)
    services.store.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (int(time.time()) - 3 * LEASE, lost))
    assert [(r["id"], r["state"]) for r in w.listing()] == [(busy, "busy"), (idle, "idle")]
    every = {r["id"]: r["state"] for r in w.listing(include_gone=True)}
    assert every == {busy: "busy", idle: "idle", gone: "stopped", lost: "lost"}
    w.job_done(busy, 1234)
    (row,) = [r for r in w.listing() if r["id"] == busy]
    assert (row["jobs_done"], row["tokens_trained"], row["job_id"], row["state"]) == (1, 1234, None, "idle")
    assert [r["id"] for r in w.live("runner")] == [idle]


# ---- processes ------------------------------------------------------------------------------
def _env(tiny_model_dir: Path, pg_url: str | None) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        GPT_FINETUNE_LOCAL_BASE_MODEL=str(tiny_model_dir),
        GPT_FINETUNE_LOG_EVERY_STEPS="1",
        GPT_FINETUNE_TRAINING_TYPE="full",
        GPT_FINETUNE_CHECKPOINT_EVERY_STEPS="4",
    )
    if pg_url:
        env["GPT_FINETUNE_STORE_URL"] = pg_url
    return env


class WorkerProcess:
    """``gpt-finetune worker`` in a process group of its own (a machine, as far as the test goes)."""

    def __init__(self, home: Path, env: dict[str, str], *args: str) -> None:
        self.log = home.parent / f"worker-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "gpt_finetune", "worker", "--home", str(home), "--lease-seconds", str(LEASE)]
        self.proc = subprocess.Popen(
            [*cmd, *args], stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:  # the worker and its training process, as a machine lost would
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _wait(what: str, check, timeout: float = 120, *logs: WorkerProcess):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen in {timeout} s\n" + "\n".join(w.text()[-3000:] for w in logs))


def _metrics(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@contextlib.contextmanager
def _cluster(tmp_path, tiny_model_dir, pg_url):
    from test_server import Server

    env = _env(tiny_model_dir, pg_url)
    home = tmp_path / "shared"  # the data directory every machine reaches
    given = ("GPT_FINETUNE_STORE_URL", "GPT_FINETUNE_TRAINING_TYPE", "GPT_FINETUNE_CHECKPOINT_EVERY_STEPS")
    server = Server(home, tiny_model_dir, env={k: env[k] for k in given})
    store = Services.open(home, store_url=pg_url)
    workers: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        before = len(store.workers.live())
        w = WorkerProcess(home, env, *args)
        workers.append(w)
        _wait("the worker's registration", lambda: len(store.workers.live()) > before, 60, w)
        return w

    try:
        yield server, store, start
    finally:
        for w in workers:
            w.kill()
        server.stop()


def test_workers_on_postgresql_train_each_job_of_serve_once_pause_cancel_and_report_it(
    pg_url, tmp_path, tiny_model_dir
):
    from test_server import free_port, upload, wait_job

    with _cluster(tmp_path, tiny_model_dir, pg_url) as (server, store, start):
        ports = [free_port(), free_port()]
        for port in ports:
            start("--metrics-port", str(port))
        client = server.client()
        train = upload(client, tmp_path, toy_examples(12))
        jobs = [
            client.fine_tuning.jobs.create(
                model="gpt-4o-mini", training_file=train.id, hyperparameters={"n_epochs": 1, "batch_size": 4}
            )
            for _ in range(3)
        ]
        long = client.fine_tuning.jobs.create(
            model="gpt-4o-mini", training_file=train.id, hyperparameters={"n_epochs": 50, "batch_size": 1}
        )
        assert not store.jobs.runner_alive()  # the server left the queue to the workers
        for job in jobs:
            done = wait_job(client, job.id)
            assert done.status == "succeeded", done.error
        # cancelled on the server, stopped on whichever machine trains it
        _wait(
            "the long job's training",
            lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id, limit=5).data),
        )
        # paused on the server: the worker that trains it saves a checkpoint and lets it go;
        # resumed, whichever worker claims it continues from there; cancelled, it stops
        loose = server.client(strict=False)  # "paused" is not among the SDK's job statuses
        loose.fine_tuning.jobs.pause(long.id)
        _wait("the workers to be idle", lambda: all(w["state"] == "idle" for w in store.workers.live()), 120)
        assert store.jobs.status(long.id) == "paused"
        loose.fine_tuning.jobs.resume(long.id)
        _wait(
            "the resumed training",
            lambda: any(
                e.message.startswith("Resuming from checkpoint")
                for e in client.fine_tuning.jobs.list_events(long.id, limit=20).data
            ),
        )
        client.fine_tuning.jobs.cancel(long.id)
        _wait("the workers to be idle", lambda: all(w["state"] == "idle" for w in store.workers.live()), 30)
        assert wait_job(client, long.id).status == "cancelled"

        rows = [store.jobs.row(j.id) for j in jobs]
        ids = {w["id"] for w in store.workers.live()}
        assert all(r["attempts"] == 1 and r["worker_id"] in ids for r in rows)  # each trained once
        listed = subprocess.run(
            [sys.executable, "-m", "gpt_finetune", "workers", "--json", "--home", str(server.home)],
            capture_output=True,
            text=True,
            env=_env(tiny_model_dir, pg_url),
            check=True,
        ).stdout
        workers = [json.loads(line) for line in listed.splitlines()]
        assert {w["id"] for w in workers} == ids and sum(w["jobs_done"] for w in workers) == 3
        assert all(w["state"] == "idle" and w["metrics_url"] for w in workers)
        assert httpx.get(server.url + "/health").json()["workers"] == {"busy": 0, "idle": 2}

        client.chat.completions.create(
            model=rows[0]["fine_tuned_model"], messages=[{"role": "user", "content": "thing 1"}], max_tokens=2
        )
        served = _metrics(httpx.get(server.url + "/metrics").text)
        assert served[("gpt_finetune_jobs", (("status", "succeeded"),))] == 3
        assert served[("gpt_finetune_jobs", (("status", "cancelled"),))] == 1
        assert served[("gpt_finetune_queue_length", ())] == 0
        assert served[("gpt_finetune_workers", (("state", "idle"),))] == 2
        assert served[("gpt_finetune_tokens_trained_total", ())] == sum(r["trained_tokens"] for r in rows) > 0
        assert served[("gpt_finetune_chat_requests_total", (("outcome", "ok"),))] == 1
        assert served[("gpt_finetune_chat_request_seconds_count", (("stream", "false"),))] == 1
        own = [_metrics(httpx.get(w["metrics_url"]).text) for w in workers]
        assert sum(m[("gpt_finetune_worker_jobs_succeeded_total", ())] for m in own) == 3
        assert all(m[("gpt_finetune_worker_lease_renewals_total", ())] >= 0 for m in own)
        assert all(m[("gpt_finetune_worker_busy", ())] == 0 for m in own)


def test_a_job_survives_its_worker_stopping_and_its_next_worker_dying(pg_url, tmp_path, tiny_model_dir):
    """Worker a is told to stop (SIGTERM) mid-job: it hands the job back and leaves. Worker b
    resumes it from the checkpoint and is then killed with its machine: its lease lapses, and
    worker c takes the job over from b's last checkpoint and finishes it."""
    from test_server import upload, wait_job

    with _cluster(tmp_path, tiny_model_dir, pg_url) as (server, store, start):
        client = server.client()
        a = start()
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini",
            training_file=upload(client, tmp_path, toy_examples(16)).id,
            hyperparameters={"n_epochs": 40, "batch_size": 2},  # 320 steps, a checkpoint every 4
        )

        def checkpoints() -> list[int]:
            return sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data)

        _wait("a's first checkpoint", checkpoints, 120, a)
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(30) == 0, a.text()
        assert "handed " + job.id + " back to the queue" in a.text()
        client.fine_tuning.jobs.retrieve(job.id)  # what would start a runner on a store without workers
        time.sleep(1.5)
        row = store.jobs.row(job.id)
        assert (row["status"], row["worker_id"], row["attempts"]) == ("queued", None, 0), a.text()
        seen = max(checkpoints())

        b = start()
        _wait("b's own checkpoint", lambda: max(checkpoints()) > seen + 4, 120, b)
        b_id = store.jobs.row(job.id)["worker_id"]
        b.kill()
        c = start()
        done = wait_job(client, job.id, timeout=300)
        assert done.status == "succeeded", (done.error, c.text())
        final = store.jobs.row(job.id)
        assert final["attempts"] == 2 and final["worker_id"] not in (None, b_id)
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any(m.startswith("Worker ") and "is shutting down" in m for m in messages)
        assert any("stopped unexpectedly; the job will resume from its last checkpoint" in m for m in messages)
        assert sum(m.startswith("Resuming from checkpoint checkpoint-") for m in messages) == 2
        # the server started no runner of its own, not even while no worker was alive
        assert {w["kind"] for w in store.workers.listing(include_gone=True)} == {"worker"}
        states = {w["id"]: w["state"] for w in store.workers.listing(include_gone=True)}
        assert list(states.values()).count("stopped") == 1 and states[b_id] in ("busy", "lost")


def test_a_worker_on_the_data_directorys_own_store_is_its_one_runner(tmp_path, tiny_model_dir):
    """On SQLite the worker takes the runner lock: it trains what is queued, and exits idle."""
    home = tmp_path / "home"
    s = Services.open(home, local_base_model=str(tiny_model_dir))
    file_id = s.files.create_from_path(write_jsonl(tmp_path / "toy.jsonl", toy_examples(12)))["id"]
    s.jobs.create(
        model=str(tiny_model_dir),
        training_file=file_id,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        options={"training_type": "full"},
        start=False,
    )
    env = _env(tiny_model_dir, None)
    env.pop("GPT_FINETUNE_STORE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "gpt_finetune", "worker", "--home", str(home), "--exit-when-idle"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    (row,) = s.store.query("SELECT status, worker_id FROM jobs")
    assert row["status"] == "succeeded" and row["worker_id"].startswith(os.uname()[1])
    assert [w["state"] for w in s.workers.listing(include_gone=True)] == ["stopped"]
    assert not s.jobs.runner_alive()


def test_a_job_no_live_worker_fits_says_what_it_waits_for_once(pg_url, tmp_path, chat_file):
    from gpt_finetune.worker.runner import Worker

    s = Services.open(tmp_path / "home", store_url=pg_url)
    fits, too_big = _queued(s, chat_file, 2)
    s.store.execute("UPDATE jobs SET need_gpus = 4, need_memory_gb = 300 WHERE id = ?", (too_big,))
    worker = Worker(s, kind="worker", gpus=1, memory_gb=80)
    worker.id = s.workers.register(kind="worker", gpus=1, memory_gb=80, lease_seconds=LEASE)
    for _ in range(2):
        worker._tell_waiting()
    told = [e["message"] for e in s.jobs.list_events(too_big)[0] if e["message"].startswith("Waiting")]
    assert told == [
        f"Waiting for a worker with 4 GPUs, 300 GB for its memory plan (live workers: {worker.id}: 1 GPU, 80 GB)"
    ]
    assert not [e for e in s.jobs.list_events(fits)[0] if e["message"].startswith("Waiting")]


def test_a_job_the_worker_cannot_start_fails_with_the_reason_and_the_worker_goes_on(tmp_path, chat_file):
    """A fault in the worker itself while starting a job (here its log cannot be opened: a
    directory stands where train.log goes, as a full or read-only disk would refuse it) is that
    job's: queued again up to its attempts, then failed naming the error; the worker does not
    end with a traceback, and trains the next job."""
    from gpt_finetune.worker.runner import Worker

    s = Services.open(tmp_path / "home")
    broken, fine = _queued(s, chat_file, 2)
    (s.home.job_dir(broken) / "train.log").mkdir(parents=True)
    worker = Worker(s, kind="worker", gpus=0, memory_gb=16)
    started: list[str] = []
    real = worker.run_job

    def run_job(job):  # the second job needs no training to show the worker went on
        started.append(job["id"])
        if job["id"] == fine:
            s.jobs.cancel(fine)
            return None
        return real(job)

    worker.run_job = run_job
    assert worker.run(exit_when_idle=True) == 0
    row = s.jobs.row(broken)
    assert row["status"] == "failed" and row["attempts"] == 3
    assert "IsADirectoryError" in row["error"]["message"] and "3 times" in row["error"]["message"]
    assert started.count(broken) == 3 and fine in started
