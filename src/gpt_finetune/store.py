"""The store: files, jobs, events, checkpoints and models. SQLite in the data directory by default;
PostgreSQL when ``store_url`` names one (several machines, one queue: README "Several machines").

Schema changes are an append-only list of migrations, one list per dialect, entry for entry the
same change (``tests/test_store.py`` checks that both give the same tables and columns); the
version is SQLite's ``PRAGMA user_version``, PostgreSQL's ``schema_version`` table. The services
write SQL once, in the common subset of the two (``?`` placeholders, ``rowid`` for insertion
order, which PostgreSQL's tables carry as a column), and ask the store for the two things that
differ: a JSON field (``json_field``) and the row lock of a claim (``claim_lock``).

SQLite: WAL mode lets the CLI, the server and the training worker read while one writes; each
thread gets its own connection. PostgreSQL through psycopg 3 rather than SQLAlchemy: the
services' SQL is already written and small, and what is needed beyond it (a connection per
thread, reconnecting after the server restarts, ``FOR UPDATE SKIP LOCKED``) is a few lines of
psycopg, where an ORM or SQLAlchemy Core would mean rewriting every query.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import StoreError

# SQLite's migrations; POSTGRES_MIGRATIONS below is the same list in PostgreSQL's words
MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL, path TEXT NOT NULL
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, model TEXT NOT NULL, base_model TEXT NOT NULL,
        status TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
        hyperparameters TEXT NOT NULL, method TEXT NOT NULL, suffix TEXT, seed INTEGER NOT NULL,
        fine_tuned_model TEXT, finished_at INTEGER, error TEXT, trained_tokens INTEGER,
        result_files TEXT NOT NULL DEFAULT '[]', metadata TEXT, options TEXT NOT NULL DEFAULT '{}',
        attempts INTEGER NOT NULL DEFAULT 0, worker_pid INTEGER, estimated_finish INTEGER
    );
    CREATE INDEX jobs_status ON jobs(status, created_at);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step_number INTEGER NOT NULL,
        fine_tuned_model_checkpoint TEXT NOT NULL UNIQUE, metrics TEXT NOT NULL, path TEXT NOT NULL
    );
    CREATE INDEX checkpoints_job ON checkpoints(job_id, step_number);
    CREATE TABLE models (
        id TEXT PRIMARY KEY, created INTEGER NOT NULL, owned_by TEXT NOT NULL, kind TEXT NOT NULL,
        base TEXT, path TEXT NOT NULL, job_id TEXT
    );
    """,
    # the memory plan a local job made at its first start, reused when it resumes
    "ALTER TABLE jobs ADD COLUMN plan TEXT;",
    # other names a model answers to (the OpenAI id of a fine-tune moved here, or the user's own)
    """
    CREATE TABLE aliases (
        id TEXT PRIMARY KEY, model TEXT NOT NULL, created INTEGER NOT NULL, note TEXT
    );
    CREATE INDEX aliases_model ON aliases(model);
    """,
    # a job's resolved description (contract.JobSpec), stored when its files are checked; rows
    # from before keep their options and load through JobSpec.from_row
    "ALTER TABLE jobs ADD COLUMN spec TEXT;",
    # until when the runner training a job holds it (epoch seconds; renewed while it trains): on a
    # store several machines share, only a job whose lease lapsed is taken for an orphan
    "ALTER TABLE jobs ADD COLUMN lease_until INTEGER;",
    # workers on several machines (``gpt-finetune worker``; the auto-started runner is one too):
    # which holds a running job (its lease is renewed only by that worker), what a job needs of
    # one (GPUs; memory once its plan is made), since when it waits in the queue, and the workers
    # themselves, for listing and metrics
    """
    ALTER TABLE jobs ADD COLUMN worker_id TEXT;
    ALTER TABLE jobs ADD COLUMN queued_at INTEGER;
    ALTER TABLE jobs ADD COLUMN need_gpus INTEGER;
    ALTER TABLE jobs ADD COLUMN need_memory_gb REAL;
    CREATE TABLE workers (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, hostname TEXT NOT NULL, pid INTEGER NOT NULL,
        started_at INTEGER NOT NULL, heartbeat_at INTEGER NOT NULL, stopped_at INTEGER,
        lease_seconds INTEGER NOT NULL, gpus INTEGER NOT NULL, memory_gb REAL NOT NULL, job_id TEXT,
        metrics_url TEXT, jobs_done INTEGER NOT NULL DEFAULT 0, tokens_trained INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX workers_heartbeat ON workers(heartbeat_at);
    """,
]

# The same migrations for PostgreSQL, entry for entry: 64-bit integers (sizes, epoch seconds past
# 2038), a ``rowid`` column where SQLite has its implicit one (the services order by it), and
# BIGSERIAL for SQLite's AUTOINCREMENT.
POSTGRES_MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        rowid BIGSERIAL UNIQUE, id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
        bytes BIGINT NOT NULL, created_at BIGINT NOT NULL, path TEXT NOT NULL
    );
    CREATE TABLE jobs (
        rowid BIGSERIAL UNIQUE, id TEXT PRIMARY KEY, created_at BIGINT NOT NULL, model TEXT NOT NULL,
        base_model TEXT NOT NULL, status TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
        hyperparameters TEXT NOT NULL, method TEXT NOT NULL, suffix TEXT, seed BIGINT NOT NULL,
        fine_tuned_model TEXT, finished_at BIGINT, error TEXT, trained_tokens BIGINT,
        result_files TEXT NOT NULL DEFAULT '[]', metadata TEXT, options TEXT NOT NULL DEFAULT '{}',
        attempts INTEGER NOT NULL DEFAULT 0, worker_pid BIGINT, estimated_finish BIGINT
    );
    CREATE INDEX jobs_status ON jobs(status, created_at);
    CREATE TABLE events (
        seq BIGSERIAL PRIMARY KEY, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
        created_at BIGINT NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at BIGINT NOT NULL, step_number BIGINT NOT NULL,
        fine_tuned_model_checkpoint TEXT NOT NULL UNIQUE, metrics TEXT NOT NULL, path TEXT NOT NULL
    );
    CREATE INDEX checkpoints_job ON checkpoints(job_id, step_number);
    CREATE TABLE models (
        id TEXT PRIMARY KEY, created BIGINT NOT NULL, owned_by TEXT NOT NULL, kind TEXT NOT NULL,
        base TEXT, path TEXT NOT NULL, job_id TEXT
    );
    """,
    "ALTER TABLE jobs ADD COLUMN plan TEXT;",
    """
    CREATE TABLE aliases (
        id TEXT PRIMARY KEY, model TEXT NOT NULL, created BIGINT NOT NULL, note TEXT
    );
    CREATE INDEX aliases_model ON aliases(model);
    """,
    "ALTER TABLE jobs ADD COLUMN spec TEXT;",
    "ALTER TABLE jobs ADD COLUMN lease_until BIGINT;",
    """
    ALTER TABLE jobs ADD COLUMN worker_id TEXT;
    ALTER TABLE jobs ADD COLUMN queued_at BIGINT;
    ALTER TABLE jobs ADD COLUMN need_gpus INTEGER;
    ALTER TABLE jobs ADD COLUMN need_memory_gb DOUBLE PRECISION;
    CREATE TABLE workers (
        rowid BIGSERIAL UNIQUE, id TEXT PRIMARY KEY, kind TEXT NOT NULL, hostname TEXT NOT NULL,
        pid BIGINT NOT NULL, started_at BIGINT NOT NULL, heartbeat_at BIGINT NOT NULL, stopped_at BIGINT,
        lease_seconds INTEGER NOT NULL, gpus INTEGER NOT NULL, memory_gb DOUBLE PRECISION NOT NULL,
        job_id TEXT, metrics_url TEXT, jobs_done BIGINT NOT NULL DEFAULT 0, tokens_trained BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX workers_heartbeat ON workers(heartbeat_at);
    """,
]

JSON_COLUMNS = {
    "hyperparameters",
    "method",
    "error",
    "result_files",
    "metadata",
    "options",
    "data",
    "metrics",
    "plan",
    "spec",
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Store:
    """What the services call, whichever database holds the rows. ``tx()`` is one write
    transaction; the helpers are each one statement in a transaction of its own."""

    dialect = ""
    shared = False  # whether other machines may use this store too (their runners' jobs are not ours)
    url: str | None = None  # as configured (store_url); None for the data directory's own file
    _local: threading.local  # each thread's connection

    def environment(self) -> dict[str, str]:
        """What a process started for this data directory (the runner, its workers) needs in its
        environment to open this same store."""
        return {"GPT_FINETUNE_STORE_URL": self.url} if self.url else {}

    def _connect(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            try:
                conn.close()
            except Exception:  # a connection the server already dropped
                pass

    @contextmanager
    def tx(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def json_field(self, column: str, key: str) -> tuple[str, list[Any]]:
        """(SQL, parameters) reading ``key`` of the JSON object in ``column`` as text."""
        raise NotImplementedError

    def try_lock(self, name: str) -> Any | None:
        """A lock on ``name`` across every process using this store, held until ``unlock`` (or
        until the holder dies), without waiting: a handle, or None when another holds it."""
        raise NotImplementedError

    def unlock(self, handle: Any) -> None:
        raise NotImplementedError

    @property
    def claim_lock(self) -> str:
        """What a claim's SELECT ends with so that two claimers never take one row (SQLite's
        BEGIN IMMEDIATE already serialises writers: nothing)."""
        return ""

    # generic helpers
    def insert(self, table: str, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.tx() as conn:
            conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", [_enc(k, v) for k, v in row.items()])

    def update(self, table: str, key: str, changes: dict[str, Any], *, where: str = "", params: tuple = ()) -> bool:
        """Update one row; ``where`` adds a condition (a ``contract.sql_in`` clause). True if it changed."""
        sets = ", ".join(f"{k} = ?" for k in changes)
        sql = f"UPDATE {table} SET {sets} WHERE id = ?" + (f" AND ({where})" if where else "")
        with self.tx() as conn:
            cur = conn.execute(sql, [*(_enc(k, v) for k, v in changes.items()), key, *params])
            return bool(cur.rowcount > 0)

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        rows = self.query(f"SELECT * FROM {table} WHERE id = ?", (key,))
        return rows[0] if rows else None

    def query(self, sql: str, params: tuple | list = ()) -> list[dict[str, Any]]:
        return [_dec(r) for r in self._read(sql, params)]

    def _read(self, sql: str, params: tuple | list) -> list[Any]:
        return list(self._connect().execute(sql, params).fetchall())

    def execute(self, sql: str, params: tuple | list = ()) -> int:
        with self.tx() as conn:
            return int(conn.execute(sql, params).rowcount)

    def delete(self, table: str, key: str) -> bool:
        with self.tx() as conn:
            return bool(conn.execute(f"DELETE FROM {table} WHERE id = ?", (key,)).rowcount > 0)


class SqliteStore(Store):
    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        hint = (
            f"move it aside (mv {self.path} {self.path}.broken) to start with an empty store; uploaded files and "
            f"models under {self.path.parent} stay, but the store no longer lists them"
        )
        if self.path.is_file() and self.path.stat().st_size == 0:
            # sqlite would take an empty file as a new database and silently start with no jobs
            raise StoreError(f"the store {self.path} is empty (0 bytes), not a database", hint=hint)
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(f"the store {self.path} cannot be read: {exc}", hint=hint) from None

    def __str__(self) -> str:
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front, so
        read-then-write sequences (claiming a job) cannot interleave across processes."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def try_lock(self, name: str) -> Any | None:
        fh = open(self.path.parent / f"{name}.lock", "a+")  # the data directory's runner.lock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def unlock(self, handle: Any) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    def json_field(self, column: str, key: str) -> tuple[str, list[Any]]:
        return f"json_extract({column}, ?)", ['$."' + key.replace('"', '""') + '"']

    def _migrate(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA quick_check(1)")  # a corrupt file fails here, not in the middle of a command
        with self.tx():
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for i, script in enumerate(MIGRATIONS[version:], start=version):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {i + 1}")


def open_store(url: str | None, default_path: Path) -> Store:
    """The store ``url`` names (``postgresql://...``), else the SQLite file ``default_path``."""
    if not url:
        return SqliteStore(default_path)
    if url.startswith(("postgresql://", "postgres://")):
        from .store_pg import PostgresStore

        return PostgresStore(url)
    if url.startswith("sqlite:///"):
        store = SqliteStore(Path(url.removeprefix("sqlite:///")).expanduser())
        store.url = url
        return store
    raise StoreError(
        f"store_url {redact_url(url)!r} is not a store this project can use",
        hint="postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE, or sqlite:///PATH (default: the data directory's file)",
    )


def redact_url(url: str) -> str:
    """A store URL with its password hidden: what messages and logs show."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:  # unparsable (an unclosed [, a bad port): hide whatever stands where a password would
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _enc(key: str, value: Any) -> Any:
    if key in JSON_COLUMNS and value is not None:
        try:
            return json.dumps(value, allow_nan=False)
        except ValueError:  # a NaN loss: stored as null, so that what is served stays JSON
            return json.dumps(_finite(value))
    return value


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dec(row: Any) -> dict[str, Any]:
    out = dict(row)
    out.pop("rowid", None)  # PostgreSQL's stand-in for SQLite's implicit column: not part of a row
    for key in JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out
