"""How fast the server answers while a job trains, against the same server while nothing trains.

    python bench/server_bench.py --home DIR [--requests 200]

Starts ``gpt-finetune serve`` on DIR (a data directory whose queue holds a training job), and
times GET requests (``/health``, ``/v1/models``, a job's events) twice: with the job's training
process paused (SIGSTOP: the baseline, nothing trains) and running. Prints p50, p95 and max.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainers(home: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"train_job --home {home}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def sample(url: str, paths: list[str], n: int) -> list[float]:
    times = []
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            t = time.perf_counter()
            client.get(url + paths[i % len(paths)]).raise_for_status()
            times.append(time.perf_counter() - t)
    return times


def row(name: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[int(0.95 * (len(ms) - 1))]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p95:.1f} | {ms[-1]:.1f} |"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    home = str(Path(args.home).resolve())
    pids = trainers(home)
    if not pids:
        print("no training process under this data directory: start a job first", file=sys.stderr)
        return 1
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gpt_finetune", "serve", "--home", home, "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        jobs = httpx.get(url + "/v1/fine_tuning/jobs").json()["data"]
        paths = ["/health", "/v1/models"] + [f"/v1/fine_tuning/jobs/{j['id']}/events" for j in jobs[:1]]
        sample(url, paths, 20)  # warm up
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            idle = sample(url, paths, args.requests)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        time.sleep(2)
        busy = sample(url, paths, args.requests)
    finally:
        server.terminate()
        server.wait(10)
    print(f"GET {', '.join(paths)} in turn, one at a time (ms)\n")
    print("| while | requests | p50 | p95 | max |\n|---|---|---|---|---|")
    print(row("nothing trains (baseline: the job's process stopped)", idle))
    print(row("a job trains (its process running)", busy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
