"""The job queue at scale, in simulation: hundreds of workers and thousands of short jobs on a real
PostgreSQL store, with workers dying and stalling at random (README "Several machines").

Each simulated worker is the real ``worker.runner.Worker``: its claim loop, its heartbeat thread
(lease renewals, status reads), its recovery of lapsed leases and its fencing. Only the training
is simulated (``SimWorker.run_job``): a job "trains" for a random short time, then completes
through ``JobService.succeed(held_by=...)`` as the training process does. Faults:

- **death**: the worker vanishes mid-job (its loop and heartbeat stop, nothing is said to the
  store), as a machine lost would; a new worker takes its place, as a restarted machine would.
- **stall**: the worker's store calls hang for longer than a lease (a network partition, a long
  pause); its lease lapses, another worker takes the job, and the stalled one must notice
  (fencing) and must not complete it.

Measured: claims per second (with the baseline, the same claims under plain ``FOR UPDATE``
without ``SKIP LOCKED``, where claimers queue behind each other's row locks), the time from a
worker's death (or stall) to its job's requeue, and every job's attempts: none lost (each ends
succeeded, or failed after the retry limit), none completed twice, no two workers training one
job at the same moment (the intervals of each job's attempts never overlap).

    python bench/queue_sim.py                       # starts a scratch PostgreSQL (tests/postgres.py)
    python bench/queue_sim.py --store-url postgresql://user@host/db --workers 300 --jobs 5000
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from gpt_finetune.contract import JobStatus  # noqa: E402
from gpt_finetune.errors import StoreError  # noqa: E402
from gpt_finetune.services import Services  # noqa: E402
from gpt_finetune.worker import runner  # noqa: E402


class Faults:
    """Which workers' store calls hang now (a stall), shared by every simulated worker."""

    def __init__(self) -> None:
        self.stalled: dict[str, float] = {}  # worker id -> until (time.monotonic)

    def check(self, worker_id: str | None) -> None:
        until = self.stalled.get(worker_id or "")
        if until is not None and time.monotonic() < until:
            raise StoreError("simulated: the store does not answer this worker")


class Log:
    """What happened, for the checks at the end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.intervals: dict[str, list[tuple[float, float, str]]] = defaultdict(list)  # job -> (start, end, worker)
        self.completions: dict[str, int] = defaultdict(int)
        self.faulted_at: dict[str, float] = {}  # job -> when its worker died or stalled (time.time)
        self.requeue_delays: list[float] = []
        self.claims = 0
        self.deaths = 0
        self.stalls = 0
        self.fenced = 0  # stalled workers that stopped training a job on their own


class SimWorker(runner.Worker):
    def __init__(self, services: Services, sim: Any, **kw: Any) -> None:
        super().__init__(services, kind="worker", gpus=0, memory_gb=16.0, **kw)
        self.sim = sim
        self.dead = threading.Event()

    def run_job(self, job: dict[str, Any]) -> None:
        sim, log = self.sim, self.sim.log
        start = time.time()
        with log.lock:
            log.claims += 1
        self.renewed, self.lost, self.job_status, self.job_id = time.monotonic(), False, None, job["id"]
        duration = random.uniform(sim.min_seconds, sim.max_seconds)
        fault_at = None
        fault = random.random()
        if fault < sim.death_rate:
            fault_at, kind = random.uniform(0, duration), "death"
        elif fault < sim.death_rate + sim.stall_rate:
            fault_at, kind = random.uniform(0, duration), "stall"
            duration = fault_at + 2 * self.lease_seconds  # long enough to outlast its lease: fencing is tried
        end = start + duration
        try:
            while time.time() < end:
                if fault_at is not None and time.time() >= start + fault_at:
                    fault_at = None
                    with log.lock:
                        log.faulted_at[job["id"]] = time.time()
                    if kind == "death":
                        with log.lock:
                            log.deaths += 1
                            log.intervals[job["id"]].append((start, time.time(), self.id or ""))
                        self.dead.set()
                        self.stopping.set()  # the heartbeat thread ends: nothing more reaches the store
                        sim.replace(self)
                        sim.finished.wait()  # a dead machine's process does nothing more
                        raise SystemExit
                    with log.lock:
                        log.stalls += 1
                    sim.faults.stalled[self.id or ""] = time.monotonic() + sim.stall_leases * self.lease_seconds
                if self.lost or time.monotonic() - self.renewed > runner.FENCE_SHARE * self.lease_seconds:
                    with log.lock:
                        log.fenced += 1
                    return  # as Worker.run_job: not this worker's job any more
                time.sleep(0.02)
            try:
                sim.faults.check(self.id)
                done = self.jobs.succeed(job["id"], held_by=self.id, trained_tokens=1)
            except StoreError:
                done = False
            if done:
                with log.lock:
                    log.completions[job["id"]] += 1
            elif self.jobs.row(job["id"])["status"] == JobStatus.RUNNING:
                # not completed, and not fenced in time: the next worker's recovery takes it
                pass
        finally:
            if not self.dead.is_set():
                with log.lock:
                    log.intervals[job["id"]].append((start, time.time(), self.id or ""))
            self.job_id = None


class Simulation:
    def __init__(self, services: Services, args: argparse.Namespace) -> None:
        self.services = services
        self.faults = Faults()
        self.log = Log()
        self.finished = threading.Event()
        self.min_seconds, self.max_seconds = args.min_seconds, args.max_seconds
        self.death_rate, self.stall_rate, self.stall_leases = args.death_rate, args.stall_rate, args.stall_leases
        self.lease = args.lease
        self.threads: list[threading.Thread] = []
        self.workers: list[SimWorker] = []
        self._patch()

    def _patch(self) -> None:
        """Route the workers' store calls through the fault injector, and time each requeue."""
        jobs, workers, faults, log = self.services.jobs, self.services.workers, self.faults, self.log
        renew, beat, recover, claim = jobs.renew_lease, workers.beat, jobs.recover_orphans, jobs.claim_next

        def claim_next(pid: int, *, worker_id: str | None = None, **kw: Any) -> dict[str, Any] | None:
            faults.check(worker_id)
            return claim(pid, worker_id=worker_id, **kw)

        def renew_lease(job_id: str, worker_id: str | None = None) -> bool:
            faults.check(worker_id)
            return renew(job_id, worker_id)

        def beat_(worker_id: str, job_id: str | None) -> None:
            faults.check(worker_id)
            beat(worker_id, job_id)

        def recover_orphans(*, startup: bool = True) -> list[str]:
            ids = recover(startup=startup)
            t = time.time()
            with log.lock:
                for i in ids:
                    if i in log.faulted_at:
                        log.requeue_delays.append(t - log.faulted_at.pop(i))
            return ids

        jobs.renew_lease = renew_lease  # type: ignore[method-assign]
        workers.beat = beat_  # type: ignore[method-assign]
        jobs.recover_orphans = recover_orphans  # type: ignore[method-assign]
        jobs.claim_next = claim_next  # type: ignore[method-assign]

    def start_worker(self) -> None:
        w = SimWorker(self.services, self, lease_seconds=self.lease)
        t = threading.Thread(target=self._run, args=(w,), daemon=True)
        self.workers.append(w)
        self.threads.append(t)
        t.start()

    def _run(self, w: SimWorker) -> None:
        try:
            w.run(exit_when_idle=False)
        except SystemExit:
            pass

    def replace(self, dead: SimWorker) -> None:
        if not self.finished.is_set():
            self.start_worker()

    def stop(self) -> None:
        self.finished.set()
        for w in self.workers:
            w.stopping.set()
        for t in self.threads:
            t.join(30)


def queue_jobs(services: Services, n: int, file_id: str) -> list[str]:
    """``n`` jobs created through the service, then queued as their file check would leave them
    (the check reads the file: not what is measured here)."""
    ids = [services.jobs.create(model="gpt-4o-mini", training_file=file_id, start=False)["id"] for _ in range(n)]
    services.store.execute(
        "UPDATE jobs SET status = 'queued', queued_at = created_at WHERE status = 'validating_files'"
    )
    return ids


def _claimer(url: str | None, home: str, lock: str, i: int, barrier: Any, out: Any) -> None:
    services = Services.open(home, store_url=url)
    cls = type(services.store)
    cls.claim_lock = property(lambda self: lock)  # type: ignore[assignment,method-assign]
    n = 0
    barrier.wait()
    while services.jobs.claim_next(i, worker_id=f"c{i}", gpus=0, memory_gb=16.0) is not None:
        n += 1
    out.put(n)


def claim_rate(url: str | None, home: Path, file_id: str | None, n_jobs: int, n_claimers: int, lock: str) -> float:
    """Claims per second of ``n_claimers`` processes (one a machine's worker) taking ``n_jobs``
    queued jobs at once, with no training between claims: the queue's own ceiling."""
    import multiprocessing as mp

    services = Services.open(home, store_url=url)
    if file_id is None:
        file_id = services.files.create_from_path(home.parent / "train.jsonl")["id"]
    services.store.execute("DELETE FROM jobs")
    queue_jobs(services, n_jobs, file_id)
    ctx = mp.get_context("spawn")  # fresh processes: no store session inherited across fork
    barrier, out = ctx.Barrier(n_claimers + 1), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(url, str(home), lock, i, barrier, out)) for i in range(n_claimers)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    counts = [out.get() for _ in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    assert sum(counts) == n_jobs, (sum(counts), n_jobs)  # each job claimed once
    return n_jobs / elapsed


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store-url", help="a PostgreSQL database to use (default: start a scratch server)")
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--lease", type=int, default=3, help="lease seconds (default 3)")
    ap.add_argument("--min-seconds", type=float, default=0.2, help="shortest simulated training")
    ap.add_argument("--max-seconds", type=float, default=4.0, help="longest simulated training")
    ap.add_argument("--death-rate", type=float, default=0.03, help="share of attempts whose worker dies")
    ap.add_argument("--stall-rate", type=float, default=0.02, help="share of attempts whose worker stalls")
    ap.add_argument("--stall-leases", type=float, default=1.5, help="how long a stall lasts, in leases")
    ap.add_argument("--claim-jobs", type=int, default=3000, help="jobs of the claim-rate runs")
    ap.add_argument("--claimers", type=int, default=16, help="processes of the claim-rate runs")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    random.seed(0)
    logging.getLogger("gpt_finetune.runner").setLevel(logging.ERROR)  # the stalls' warnings are expected
    runner.STORE_RETRY_SECONDS = 1.0  # a stalled worker looks again soon
    tmp = Path("bench/out/queue_sim")
    tmp.mkdir(parents=True, exist_ok=True)
    server = None
    url = args.store_url
    if url is None:
        from postgres import Server

        server = Server(max_connections=3 * args.workers + 50)  # each worker: its loop's and heartbeat's sessions
        server.start()
        url = server.new_database(f"queue_sim_{int(time.time())}")
    try:
        services = Services.open(tmp / "home", store_url=url)
        example = tmp / "train.jsonl"
        example.write_text(
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n' * 10
        )
        file_id = services.files.create_from_path(example)["id"]

        print(f"claim rate: {args.claim_jobs} queued jobs, {args.claimers} claiming processes", flush=True)
        home, n, c = tmp / "home", args.claim_jobs, args.claimers
        skip = claim_rate(url, home, file_id, n, c, " FOR UPDATE SKIP LOCKED")
        plain = claim_rate(url, home, file_id, n, c, " FOR UPDATE")
        sqlite = claim_rate(None, tmp / "sqlite-home", None, n, c, "")
        print(f"  SKIP LOCKED {skip:,.0f}/s, FOR UPDATE {plain:,.0f}/s, SQLite {sqlite:,.0f}/s", flush=True)

        services.store.execute("DELETE FROM jobs")
        services.store.execute("DELETE FROM events")
        ids = queue_jobs(services, args.jobs, file_id)
        sim = Simulation(services, args)
        print(f"simulation: {args.workers} workers, {args.jobs} jobs, lease {args.lease} s", flush=True)
        t0 = time.time()
        for _ in range(args.workers):
            sim.start_worker()
        deadline = t0 + args.timeout
        terminal = ("succeeded", "failed", "cancelled")
        while time.time() < deadline:
            left = services.store.query("SELECT COUNT(*) AS n FROM jobs WHERE status NOT IN (?, ?, ?)", terminal)[0][
                "n"
            ]
            if left == 0:
                break
            time.sleep(1)
            print(f"  {time.time() - t0:6.0f} s: {left} jobs left, {sim.log.claims} claims", flush=True)
        wall = time.time() - t0
        sim.stop()

        rows = {r["id"]: r for r in services.store.query("SELECT id, status, attempts FROM jobs")}
        log = sim.log
        lost = [i for i in ids if rows[i]["status"] not in terminal]
        doubled = [i for i, n in log.completions.items() if n > 1]
        succeeded = [i for i in ids if rows[i]["status"] == "succeeded"]
        not_recorded = [i for i in succeeded if log.completions.get(i, 0) != 1]
        overlaps = 0
        for spans in log.intervals.values():
            last_end = 0.0
            for start, end, _ in sorted(spans):
                overlaps += start < last_end
                last_end = max(last_end, end)
        failed = sum(1 for i in ids if rows[i]["status"] == "failed")
        delays = log.requeue_delays
        print()
        print("| measure | value |")
        print("|---|---:|")
        print(f"| workers / jobs / lease | {args.workers} / {args.jobs} / {args.lease} s |")
        print(f"| claims/s, PostgreSQL, FOR UPDATE SKIP LOCKED (ours; {c} processes) | {skip:,.0f} |")
        print(f"| claims/s, PostgreSQL, plain FOR UPDATE (baseline; {c} processes) | {plain:,.0f} |")
        print(f"| claims/s, SQLite, BEGIN IMMEDIATE (the one-machine store; {c} processes) | {sqlite:,.0f} |")
        print(f"| simulation wall time | {wall:.0f} s |")
        print(f"| claims in the simulation (incl. retries) | {log.claims} ({log.claims / wall:.0f}/s) |")
        print(
            f"| worker deaths / stalls / stalled workers that fenced themselves | {log.deaths} / {log.stalls} / {log.fenced} |"
        )
        print(
            f"| death or stall to requeue: median / p95 / max | {statistics.median(delays) if delays else float('nan'):.2f} / "
            f"{percentile(delays, 0.95):.2f} / {max(delays) if delays else float('nan'):.2f} s "
            f"(target <= {2 * args.lease} s) |"
        )
        print(f"| jobs succeeded / failed after {3} attempts | {len(succeeded)} / {failed} |")
        print(
            f"| lost (not terminal) / completed twice / overlapping attempts | {len(lost)} / {len(doubled)} / {overlaps} |"
        )
        print(f"| succeeded without exactly one completion | {len(not_recorded)} |")
        ok = not lost and not doubled and not overlaps and not not_recorded
        return 0 if ok else 1
    finally:
        if server is not None:
            server.remove()


if __name__ == "__main__":
    sys.exit(main())
