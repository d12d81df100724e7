"""``worker`` and ``workers``: train jobs on this machine from a store that several machines
share, and list the workers that do (README "Several machines")."""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import time
from typing import Any

from ..errors import ConfigError
from .common import add_config_flag, info, settings_from, typed


def add_worker(p: argparse.ArgumentParser) -> None:
    add_config_flag(p)
    p.add_argument(
        "--gpus",
        type=_count,
        metavar="N",
        help="GPUs this worker offers (default: the CUDA devices it sees); a job trained on N processes needs N",
    )
    p.add_argument(
        "--memory-gb",
        dest="worker_memory_gb",
        type=typed("memory_limit_gb", "--memory-gb"),
        metavar="GB",
        help="memory a job's plan may use here (default: the smallest GPU's, else the memory available now)",
    )
    p.add_argument(
        "--lease-seconds",
        type=typed("limit", "--lease-seconds"),
        metavar="S",
        help="how long a claimed job stays this worker's without a heartbeat (default 30): a worker or "
        "machine lost for longer hands its job to another worker",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port at /metrics (default: none)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    p.add_argument(
        "--executor",
        dest="executor",
        type=typed("executor"),
        help="local (default): jobs train in this worker's own processes; ray: submitted to a Ray cluster",
    )
    p.add_argument(
        "--ray-address",
        dest="ray_address",
        metavar="URL",
        help="the Ray cluster's job API, http://HEAD:8265 (executor ray; or ray_address = ..., or RAY_ADDRESS)",
    )
    p.add_argument(
        "--ray-gpus",
        dest="ray_gpus",
        type=typed("ray_gpus"),
        metavar="N",
        help="GPUs each training process asks Ray for (default 0: CPU; or ray_gpus = N); "
        "a job on several processes asks for N per process, as a Ray Train run",
    )
    p.add_argument("--exit-when-idle", action="store_true", help="stop when no job is queued or running")
    p.set_defaults(func=cmd_worker)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"--gpus {text!r}: must be a whole number, 0 or more")
    return n


def add_workers(p: argparse.ArgumentParser) -> None:
    add_config_flag(p)
    p.add_argument("--all", action="store_true", help="also the workers that stopped or were lost in the last day")
    p.add_argument("--json", action="store_true", help="one JSON object a worker")
    p.set_defaults(func=cmd_workers)


def cmd_worker(ns: argparse.Namespace) -> int:
    import logging

    from ..services import Services
    from ..services.jobs import LEASE_SECONDS
    from ..worker.runner import Worker

    s = settings_from(ns)
    if ns.metrics_port is not None and not 0 < ns.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port {ns.metrics_port}: must be from 1 to 65535")
    if ns.lease_seconds is not None and ns.lease_seconds < 2:
        raise ConfigError(f"--lease-seconds {ns.lease_seconds}: must be at least 2")
    services = Services.open(s.home, model_cache=s.model_cache, store_url=s.store_url)
    logging.getLogger("gpt_finetune.runner").setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s worker: %(message)s"))
    logging.getLogger("gpt_finetune.runner").addHandler(handler)
    logging.getLogger("gpt_finetune.runner").propagate = False

    options: dict[str, Any] = dict(
        kind="worker",
        gpus=ns.gpus,
        memory_gb=ns.worker_memory_gb,
        lease_seconds=ns.lease_seconds or LEASE_SECONDS,
        malloc=s.malloc,
    )
    worker: Worker
    if s.executor == "ray":
        import os

        from ..worker.ray_executor import RayWorker

        address = s.ray_address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ConfigError("executor ray needs the cluster's address", hint="give --ray-address http://HEAD:8265")
        # the cluster's resources are Ray's to allot (RayWorker claims every job; Ray schedules it)
        options["gpus"] = ns.gpus or 0
        options["memory_gb"] = ns.worker_memory_gb or 0.0
        worker = RayWorker(services, ray_address=address, ray_gpus=s.ray_gpus or 0, **options)
    else:
        worker = Worker(services, **options)
    if ns.metrics_port is not None:
        worker.metrics_url = serve_worker_metrics(worker, ns.metrics_host, ns.metrics_port)

    def stop(signum: int, _frame: Any) -> None:
        if worker.stopping.is_set():  # asked twice: leave now (the job's lease lapses, another resumes it)
            raise KeyboardInterrupt
        info(f"{signal.Signals(signum).name}: handing the job back and stopping (again to stop at once)")
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    lock = None
    if not services.store.shared:
        # the data directory's own store has one worker at a time: this one, once an automatic
        # runner (started by a job's creation) has finished what it holds
        lock = services.jobs.runner_lock()
        told = False
        while not lock.acquire():
            if not told:
                info("Another runner trains this data directory's jobs; waiting for it to finish")
                told = True
            if worker.stopping.wait(1.0):
                return 0
    try:
        info("Ctrl-C or SIGTERM: hand the running job back to the queue and stop")
        return worker.run(exit_when_idle=ns.exit_when_idle)
    finally:
        if lock is not None:
            lock.release()


def serve_worker_metrics(worker: Any, host: str, port: int) -> str:
    """The worker's Prometheus endpoint (prometheus_client's own server, in a thread)."""
    from prometheus_client import start_http_server

    from ..worker.runner import worker_registry

    server, _thread = start_http_server(port, addr=host, registry=worker_registry(worker))
    bound = server.server_address[1]
    shown = host if host not in ("0.0.0.0", "::") else "localhost"
    url = f"http://{shown}:{bound}/metrics"
    info(f"Metrics at {url}")
    return url


def _age(t: float | None) -> str:
    if t is None:
        return "-"
    s = max(0, int(time.time() - t))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def cmd_workers(ns: argparse.Namespace) -> int:
    import json

    from ..services import Services

    s = settings_from(ns)
    services = Services.open(s.home, model_cache=s.model_cache, store_url=s.store_url)
    rows = services.workers.listing(include_gone=ns.all)
    if ns.json:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "rowid"}))
        return 0
    if not rows:
        info("No worker is alive" + ("" if ns.all else " (--all: also those that stopped in the last day)"))
        return 0
    header = ("ID", "KIND", "STATE", "JOB", "GPUS", "MEMORY", "JOBS", "TOKENS", "STARTED", "HEARTBEAT")
    table = [header] + [
        (
            row["id"],
            row["kind"],
            row["state"],
            row["job_id"] or "-",
            str(row["gpus"]),
            f"{row['memory_gb']:g} GB",
            str(row["jobs_done"]),
            str(row["tokens_trained"]),
            dt.datetime.fromtimestamp(row["started_at"]).strftime("%Y-%m-%d %H:%M"),
            _age(row["heartbeat_at"]),
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
