"""The workers that train jobs, as the store knows them: each registers when it starts, beats
every third of its lease while it lives, and says so when it stops. A worker that stopped beating
for two leases is gone (a machine lost, a process killed): it is listed as such, and the leases of
its jobs lapse in the same time, so another worker resumes them (``JobService.recover_orphans``).

Listing (``gpt-finetune workers``, ``/health``), the metrics endpoints and ``kick`` read this;
nothing here decides which job a worker trains (``JobService.claim_next`` does).
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

from ..store import Store, now

KINDS = ("runner", "worker")  # started by kick for a data directory and gone when idle; started by hand


class WorkerService:
    def __init__(self, store: Store) -> None:
        self.store = store

    def register(
        self, *, kind: str, gpus: int, memory_gb: float, lease_seconds: int, metrics_url: str | None = None
    ) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        host = socket.gethostname()
        worker_id = f"{host}-{os.getpid()}-{secrets.token_hex(3)}"  # readable in a listing, unique across restarts
        t = now()
        self.store.insert(
            "workers",
            {
                "id": worker_id,
                "kind": kind,
                "hostname": host,
                "pid": os.getpid(),
                "started_at": t,
                "heartbeat_at": t,
                "stopped_at": None,
                "lease_seconds": int(lease_seconds),
                "gpus": int(gpus),
                "memory_gb": float(memory_gb),
                "job_id": None,
                "metrics_url": metrics_url,
            },
        )
        return worker_id

    def beat(self, worker_id: str, job_id: str | None) -> None:
        """Alive, training ``job_id`` (None: idle)."""
        self.store.update("workers", worker_id, {"heartbeat_at": now(), "job_id": job_id})

    def job_done(self, worker_id: str, tokens: int) -> None:
        self.store.execute(
            "UPDATE workers SET jobs_done = jobs_done + 1, tokens_trained = tokens_trained + ?, job_id = NULL "
            "WHERE id = ?",
            (int(tokens), worker_id),
        )

    def stopped(self, worker_id: str) -> None:
        self.store.update("workers", worker_id, {"stopped_at": now(), "job_id": None})

    def listing(self, *, include_gone: bool = False) -> list[dict[str, Any]]:
        """Workers with their ``state``: ``busy`` or ``idle`` while they beat; with
        ``include_gone``, also the last day's ``stopped`` (said so) and ``lost`` (silent for two
        leases) ones."""
        t = now()
        if include_gone:
            sql, params = "SELECT * FROM workers WHERE heartbeat_at >= ?", (t - 86400,)
        else:
            sql, params = (
                "SELECT * FROM workers WHERE stopped_at IS NULL AND heartbeat_at >= ? - 2 * lease_seconds",
                (t,),
            )
        rows = self.store.query(sql + " ORDER BY started_at, rowid", params)
        for row in rows:
            if row["stopped_at"] is not None:
                row["state"] = "stopped"
            elif row["heartbeat_at"] < t - 2 * row["lease_seconds"]:
                row["state"] = "lost"
            else:
                row["state"] = "busy" if row["job_id"] else "idle"
        return rows

    def seen(self, kind: str) -> bool:
        """Whether a worker of ``kind`` has run in the last day (alive or not)."""
        return bool(
            self.store.query(
                "SELECT 1 FROM workers WHERE kind = ? AND heartbeat_at >= ? LIMIT 1", (kind, now() - 86400)
            )
        )

    def live(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [w for w in self.listing() if kind is None or w["kind"] == kind]
