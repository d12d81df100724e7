"""The store in both dialects, on a real PostgreSQL server (tests/postgres.py): the same schema
from the same migrations, the services' queries alike on either, claims that never hand one job
to two claimers, an outage of the server waited out, and a whole job through `serve`, its
runner and the official client with the store on PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from gpt_finetune.errors import StoreError
from gpt_finetune.services import Services
from gpt_finetune.store import MIGRATIONS, POSTGRES_MIGRATIONS, SqliteStore, open_store, redact_url

pytest.importorskip("psycopg")


def _columns_sqlite(store: SqliteStore) -> dict[str, list[str]]:
    tables = [r["name"] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {
        t: [r["name"] for r in store.query(f"PRAGMA table_info({t})")] for t in tables if not t.startswith("sqlite_")
    }


def _columns_pg(store) -> dict[str, list[str]]:
    rows = store.query(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "ORDER BY table_name, ordinal_position"
    )
    out: dict[str, list[str]] = {}
    for r in rows:
        if r["table_name"] != "schema_version" and r["column_name"] != "rowid":
            out.setdefault(r["table_name"], []).append(r["column_name"])
    return out


def test_both_dialects_migrate_to_the_same_tables_and_columns(tmp_path, pg_url):
    assert len(MIGRATIONS) == len(POSTGRES_MIGRATIONS)
    sqlite = SqliteStore(tmp_path / "store.db")
    pg = open_store(pg_url, tmp_path / "unused.db")
    assert pg.dialect == "postgresql"
    assert _columns_pg(pg) == _columns_sqlite(sqlite)
    # opened again (a second machine, a restart): nothing runs twice
    again = open_store(pg_url, tmp_path / "unused.db")
    assert again.query("SELECT version FROM schema_version") == [{"version": len(POSTGRES_MIGRATIONS)}]


@pytest.fixture(params=["sqlite", "postgresql"])
def services(request, tmp_path):
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return Services.open(tmp_path / "home", store_url=url)


def test_the_services_queries_answer_alike_on_either_store(services, tmp_path, chat_file):
    s = services
    files = [s.files.create_from_path(chat_file) for _ in range(3)]
    assert [f["id"] for f in s.files.list()] == [f["id"] for f in reversed(files)]
    page, more = s.files.page(limit=2)
    assert more and [f["id"] for f in page] == [f["id"] for f in reversed(files)][:2]
    jobs = [
        s.jobs.create(model="gpt-4o-mini", training_file=files[0]["id"], metadata={"team": t}, start=False)
        for t in ("net", "web", "net")
    ]
    listed, more = s.jobs.list_jobs(limit=2)
    assert [j["id"] for j in listed] == [jobs[2]["id"], jobs[1]["id"]] and more  # newest first, same second
    rest, more = s.jobs.list_jobs(limit=2, after=listed[-1]["id"])
    assert [j["id"] for j in rest] == [jobs[0]["id"]] and not more
    net, _ = s.jobs.list_jobs(metadata={"team": "net"})
    assert [j["id"] for j in net] == [jobs[2]["id"], jobs[0]["id"]]
    assert s.jobs.list_jobs(metadata={"team": "o'brien\"; --"})[0] == []  # a key's value is data, never SQL
    for i in range(5):
        s.jobs.event(jobs[0]["id"], f"event {i}")
    events, more = s.jobs.list_events(jobs[0]["id"], limit=3)
    assert [e["message"] for e in events] == ["event 4", "event 3", "event 2"] and more
    older, _ = s.jobs.list_events(jobs[0]["id"], limit=2, after=events[-1]["id"])
    assert [e["message"] for e in older] == ["event 1", "event 0"]
    # JSON columns come back as they went in, a NaN as null
    s.store.update("jobs", jobs[1]["id"], {"error": {"code": "x", "loss": float("nan")}})
    assert s.jobs.row(jobs[1]["id"])["error"] == {"code": "x", "loss": None}
    assert "rowid" not in s.jobs.row(jobs[1]["id"])


def test_claimers_racing_for_queued_jobs_never_take_one_twice(services, tmp_path, chat_file):
    s = services
    file_id = s.files.create_from_path(chat_file)["id"]
    ids = [s.jobs.create(model="gpt-4o-mini", training_file=file_id, start=False)["id"] for _ in range(12)]
    s.store.execute("UPDATE jobs SET status = 'queued'")
    claimed: list[tuple[int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def claimer(pid: int) -> None:
        mine = Services.open(tmp_path / "home", store_url=s.store.url)  # a process of its own, as a worker is
        start.wait()
        while (row := mine.jobs.claim_next(pid)) is not None:
            with lock:
                claimed.append((pid, row["id"]))

    threads = [threading.Thread(target=claimer, args=(pid,)) for pid in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(job for _, job in claimed) == sorted(ids)  # every job once, none twice
    rows = {r["id"]: r for r in s.store.query("SELECT id, status, attempts, worker_pid FROM jobs")}
    assert all(r["status"] == "running" and r["attempts"] == 1 for r in rows.values())
    assert {rows[job]["worker_pid"] for _, job in claimed} == {pid for pid, _ in claimed}


def test_a_postgresql_restart_is_waited_out_and_nothing_written_is_lost(postgres, pg_url, tmp_path, chat_file):
    s = Services.open(tmp_path / "home", store_url=pg_url)
    file_id = s.files.create_from_path(chat_file)["id"]
    job_id = s.jobs.create(model="gpt-4o-mini", training_file=file_id, start=False)["id"]
    written: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:  # a worker's events while the server restarts
        try:
            for i in range(40):
                s.jobs.event(job_id, f"step {i}")
                written.append(i)
                time.sleep(0.05)
        except BaseException as exc:  # the assertion below shows it
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)
    postgres.restart()
    t.join(120)
    assert not errors and written == list(range(40))
    events, _ = s.jobs.list_events(job_id, limit=100)
    assert sorted(int(e["message"].split()[1]) for e in events if e["message"].startswith("step ")) == written
    # a transaction (a claim's kind) on the connection that a second restart dropped while idle
    s.store.execute("UPDATE jobs SET status = 'queued'")
    s.store.idle_ping_seconds = 0.0
    postgres.restart()
    with s.store.tx() as conn:
        assert (
            conn.execute("SELECT id FROM jobs WHERE status = 'queued'" + s.store.claim_lock).fetchone()["id"] == job_id
        )
    assert s.jobs.claim_next(4242)["id"] == job_id


def test_a_store_that_cannot_be_reached_is_one_clear_error_without_its_password(tmp_path, postgres):
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{postgres.port + 1 if postgres.port < 65535 else 1}/none"
    with pytest.raises(StoreError) as err:
        open_store(url, tmp_path / "unused.db")
    assert "s3cret-pw" not in str(err.value) and "postgres:***@127.0.0.1" in str(err.value)
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(StoreError, match="not a store"):
        open_store("mysql://u@h/db", tmp_path / "unused.db")
    for unparsable in ("postgresql://u:s3cret-pw@[::1/db", "postgresql://u:s3cret-pw@h:notaport/db"):
        with pytest.raises(StoreError) as err:
            open_store(unparsable, tmp_path / "unused.db")
        assert "s3cret-pw" not in str(err.value) and "u:***@" in str(err.value)


@contextlib.contextmanager
def _serve_on_postgresql(pg_url, tmp_path, tiny_model_dir):
    """``gpt-finetune serve`` (and the runner it starts) with the store on PostgreSQL."""
    from test_server import Server

    server = Server(
        tmp_path / "home", tiny_model_dir, env={"GPT_FINETUNE_TRAINING_TYPE": "full", "GPT_FINETUNE_STORE_URL": pg_url}
    )
    try:
        yield server
    finally:
        server.stop()


def test_a_job_through_serve_and_its_runner_with_the_store_on_postgresql(pg_url, tmp_path, tiny_model_dir):
    from conftest import toy_examples
    from test_server import upload, wait_job

    with _serve_on_postgresql(pg_url, tmp_path, tiny_model_dir) as server:
        client = server.client()
        train = upload(client, tmp_path, toy_examples(12))
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini",
            training_file=train.id,
            hyperparameters={"n_epochs": 1, "batch_size": 4},
            metadata={"store": "pg"},
        )
        done = wait_job(client, job.id)
        assert done.status == "succeeded", done.error
        assert [j.id for j in client.fine_tuning.jobs.list(metadata={"store": "pg"}).data] == [job.id]
        answer = client.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "thing 1"}], max_tokens=4
        )
        assert answer.choices[0].message.content is not None
    # the rows are in PostgreSQL, and the data directory has no SQLite store of its own
    pg = open_store(pg_url, tmp_path / "unused.db")
    assert pg.query("SELECT status FROM jobs WHERE id = ?", (job.id,)) == [{"status": "succeeded"}]
    assert not (tmp_path / "home" / "gpt-finetune.db").exists()


def test_one_runner_per_postgresql_store_whichever_data_directory_asks(pg_url, tmp_path):
    """Two machines (two data directories) sharing one store: while a runner holds the lock, the
    other sees a runner alive and would not start one (whose orphan recovery would take the first
    one's running job for an orphan); the SQLite store's lock stays per data directory."""
    a = Services.open(tmp_path / "machine-a", store_url=pg_url)
    b = Services.open(tmp_path / "machine-b", store_url=pg_url)
    lock = a.jobs.runner_lock()
    assert not b.jobs.runner_alive() and lock.acquire()
    assert b.jobs.runner_alive() and a.jobs.runner_alive()
    assert not b.jobs.runner_lock().acquire(attempts=2)
    lock.release()
    assert not b.jobs.runner_alive()
    c, d = Services.open(tmp_path / "sqlite-c"), Services.open(tmp_path / "sqlite-d")
    held = c.jobs.runner_lock()
    assert held.acquire() and c.jobs.runner_alive() and not d.jobs.runner_alive()
    held.release()
    assert not c.jobs.runner_alive()


def test_the_runner_is_started_with_the_store_and_model_cache_it_was_configured_with(
    pg_url, tmp_path, chat_file, monkeypatch
):
    """Set by a flag or a config file, neither is in the environment the runner inherits: the
    launcher is given both."""
    monkeypatch.delenv("GPT_FINETUNE_MODEL_CACHE", raising=False)
    started: list[dict[str, str]] = []
    s = Services.open(
        tmp_path / "home",
        store_url=pg_url,
        model_cache=tmp_path / "cache",
        launcher=lambda home, env: started.append(env),
    )
    file_id = s.files.create_from_path(chat_file)["id"]
    s.jobs.create(model="gpt-4o-mini", training_file=file_id)
    assert started == [{"GPT_FINETUNE_STORE_URL": pg_url, "GPT_FINETUNE_MODEL_CACHE": str(tmp_path / "cache")}]


def test_a_postgresql_restart_while_a_job_trains_loses_nothing_and_the_job_finishes(
    postgres, pg_url, tmp_path, tiny_model_dir
):
    from conftest import toy_examples
    from test_server import upload, wait_job

    with _serve_on_postgresql(pg_url, tmp_path, tiny_model_dir) as server:
        client = server.client()
        train = upload(client, tmp_path, toy_examples(40))
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini", training_file=train.id, hyperparameters={"n_epochs": 3, "batch_size": 4}
        )
        deadline = time.time() + 120
        while time.time() < deadline:  # training: its first metrics are in the store
            events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
            if any(e.type == "metrics" for e in events):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the job did not start training")
        postgres.restart()  # every session dropped: the server's, the runner's, the training process's
        done = wait_job(client, job.id)
        assert done.status == "succeeded", done.error
        events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
        steps = sorted(e.data["step"] for e in events if e.type == "metrics")
        messages = [e.message for e in reversed(events) if e.type != "metrics"]
        assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == 30, messages  # each step's metrics, once
        assert not any("resume" in e.message for e in events)  # waited out, not recovered from a checkpoint


def test_on_a_shared_store_only_a_running_job_whose_lease_lapsed_is_taken_for_an_orphan(pg_url, tmp_path, chat_file):
    s = Services.open(tmp_path / "home", store_url=pg_url)
    file_id = s.files.create_from_path(chat_file)["id"]
    for _ in range(2):
        s.jobs.create(model="gpt-4o-mini", training_file=file_id, start=False)
    s.store.execute("UPDATE jobs SET status = 'queued'")
    held, lapsed = s.jobs.claim_next(1)["id"], s.jobs.claim_next(2)["id"]
    s.store.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (int(time.time()) - 1, lapsed))
    assert s.jobs.recover_orphans() == [lapsed]  # the other runner's job, its lease live, stays its own
    assert s.jobs.status(held) == "running" and s.jobs.status(lapsed) == "queued"
    s.jobs.renew_lease(held)
    assert s.jobs.row(held)["lease_until"] >= int(time.time()) + 20


def test_an_insert_retried_after_its_answer_was_lost_is_not_doubled_nor_an_error(pg_url, tmp_path, monkeypatch):
    import psycopg

    from gpt_finetune.store import Store

    store = open_store(pg_url, tmp_path / "unused.db")
    real, calls = Store.insert, {"n": 0}

    def committed_then_lost(self, table, row):
        calls["n"] += 1
        real(self, table, row)
        if calls["n"] == 1:  # the row is committed; the answer never comes back
            self._local.conn.raw.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(Store, "insert", committed_then_lost)
    store.insert("aliases", {"id": "old-name", "model": "ft:x", "created": 1, "note": None})
    assert calls["n"] == 2 and store.query("SELECT id FROM aliases") == [{"id": "old-name"}]
