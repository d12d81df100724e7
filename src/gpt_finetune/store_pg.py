"""The store on PostgreSQL (``store_url = postgresql://...``): one database that the server and the
workers of several machines share.

Imported only when a PostgreSQL URL is configured, so psycopg (the ``[postgres]`` extra) is
needed only then. Each thread has its own connection, in autocommit mode outside ``tx()``: a
read is one short statement and no transaction stays open while a job trains. A connection that
the server dropped (a restart, a failover) is replaced on the next call, and the store's
one-statement helpers retry for up to ``RECONNECT_SECONDS`` while the server is unreachable, so a
restart during a job is waited out rather than failing it. A statement whose commit was sent but
whose answer was lost may then run twice: the helpers' statements are updates of a row to a
value (the same twice) or inserts of a row with a fresh id, which the retry finds there as a
duplicate key and takes for done instead of doubling.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import StoreError
from .store import POSTGRES_MIGRATIONS, Store, redact_url

try:
    import psycopg
    from psycopg.rows import dict_row
except ImportError:  # pragma: no cover - the extra is not installed
    psycopg = None  # type: ignore[assignment]

RECONNECT_SECONDS = 60.0
MIGRATION_LOCK = 0x67707466  # pg_advisory_xact_lock key: two processes starting at once migrate in turn
T = TypeVar("T")


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """The services' SQL (``?`` placeholders, SQLite's style) in psycopg's (``%s``, literal ``%%``).
    The services never put a ``?`` inside a string literal: values are always parameters."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Connection:
    """A psycopg connection that takes the services' SQL."""

    def __init__(self, conn: Any) -> None:
        self.raw = conn
        self.used = time.monotonic()

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        self.used = time.monotonic()
        if params:
            return self.raw.execute(_pg_sql(sql), list(params))
        return self.raw.execute(sql)

    @property
    def usable(self) -> bool:
        return not (self.raw.closed or self.raw.broken)

    def close(self) -> None:
        self.raw.close()


class PostgresStore(Store):
    dialect = "postgresql"
    shared = True
    url: str
    # a transaction on a connection idle this long first checks that the server is still the
    # one it connected to (a restart drops every session, which shows only at the next statement)
    idle_ping_seconds = 5.0

    def __init__(self, url: str, *, reconnect_seconds: float = RECONNECT_SECONDS) -> None:
        if psycopg is None:
            raise StoreError(
                "store_url names a PostgreSQL database, but psycopg is not installed",
                hint="pip install 'gpt-finetune[postgres]' (psycopg 3)",
            )
        self.url: str = url
        self.reconnect_seconds = reconnect_seconds
        self._local = threading.local()
        self._connect()  # a wrong URL or a server that is down fails now, not after the retries
        try:
            self._migrate()
        except psycopg.Error as exc:
            self.close()
            raise StoreError(f"the store {self} cannot be used: {self._reason(exc)}") from None

    def __str__(self) -> str:
        return redact_url(self.url)

    def _connect(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.usable:
            return conn
        if conn is not None:
            self.close()
        try:
            raw = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"cannot reach the store {self}: {self._reason(exc)}",
                hint="check that PostgreSQL is running and that store_url names its host, port, user and database",
            ) from None
        except psycopg.Error as exc:  # a URL libpq cannot parse (a bad port, an unclosed [, an unknown option)
            raise StoreError(
                f"store_url {self} is not a PostgreSQL URL libpq can use: {self._reason(exc)}",
                hint="postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?OPTION=VALUE]",
            ) from None
        conn = _Connection(raw)
        self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[_Connection]:
        """One transaction. A claim's ``SELECT ... FOR UPDATE SKIP LOCKED`` (``claim_lock``) inside
        it holds its row until the commit, and other claimers skip that row."""
        conn = self._live()
        try:
            with conn.raw.transaction():
                yield conn
        except psycopg.OperationalError as exc:  # the server went away mid-transaction: nothing committed
            self.close()
            raise StoreError(f"the store {self} failed: {self._reason(exc)}") from None

    def _live(self) -> _Connection:
        """The thread's connection, checked if it has been idle, or a new one: retried while the
        server cannot be reached, up to ``reconnect_seconds``."""

        def checked() -> _Connection:
            conn = self._connect()
            if time.monotonic() - conn.used > self.idle_ping_seconds:
                conn.execute("SELECT 1")
            return conn

        return self._retry(checked)

    def json_field(self, column: str, key: str) -> tuple[str, list[Any]]:
        return f"({column}::jsonb ->> ?)", [key]

    @property
    def claim_lock(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def _retry(self, op: Callable[[], T]) -> T:
        """``op`` once, or again while the server cannot be reached (a restart), up to
        ``reconnect_seconds``."""
        deadline = time.monotonic() + self.reconnect_seconds
        delay = 0.2
        while True:
            try:
                return op()
            except (psycopg.OperationalError, StoreError) as exc:
                conn = getattr(self._local, "conn", None)
                lost = conn is None or not conn.usable
                if not lost or time.monotonic() + delay > deadline:
                    if isinstance(exc, StoreError):
                        raise
                    raise StoreError(f"the store {self} failed: {self._reason(exc)}") from None
                self.close()
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def insert(self, table: str, row: dict[str, Any]) -> None:
        tries = [0]

        def once() -> None:
            tries[0] += 1
            try:
                Store.insert(self, table, row)
            except psycopg.errors.UniqueViolation:
                if tries[0] == 1:
                    raise
                # a retry after a lost answer: the first try committed this very row (its id is new)

        self._retry(once)

    def update(self, table: str, key: str, changes: dict[str, Any], *, where: str = "", params: tuple = ()) -> bool:
        return self._retry(lambda: Store.update(self, table, key, changes, where=where, params=params))

    def query(self, sql: str, params: tuple | list = ()) -> list[dict[str, Any]]:
        return self._retry(lambda: Store.query(self, sql, params))

    def execute(self, sql: str, params: tuple | list = ()) -> int:
        return self._retry(lambda: Store.execute(self, sql, params))

    def delete(self, table: str, key: str) -> bool:
        return self._retry(lambda: Store.delete(self, table, key))

    def _reason(self, exc: BaseException) -> str:
        """psycopg's message, first line only (the rest repeats the connection details), with the
        URL, which libpq's parse errors quote, shown without its password."""
        text = str(exc).strip().splitlines()
        return text[0].replace(self.url, str(self)) if text else type(exc).__name__

    def try_lock(self, name: str) -> Any | None:
        """A session advisory lock on ``name``, held by a connection of its own until ``unlock``
        (or until this process dies: the server then drops the session and the lock), else None
        when another session holds it."""
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", ["gpt-finetune " + name]).fetchone()
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot reach the store {self}: {self._reason(exc)}") from None
        if got and got[0]:
            return conn
        conn.close()
        return None

    def unlock(self, handle: Any) -> None:
        handle.close()  # the session's end releases its advisory locks

    def _migrate(self) -> None:
        with self.tx() as conn:
            conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = int(row["version"]) if row else 0
            if version > len(POSTGRES_MIGRATIONS):
                raise StoreError(
                    f"the store {self} was written by a newer gpt-finetune (schema {version}, this one knows "
                    f"{len(POSTGRES_MIGRATIONS)})",
                    hint="upgrade gpt-finetune on this machine to the version the other machines run",
                )
            for i, script in enumerate(POSTGRES_MIGRATIONS[version:], start=version):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (i + 1,))
