"""Benchmark prepare, validate and stats against the cookbook-style baseline, side by side.

    python bench/data_bench.py --examples 1000000

Generates seed-format JSONL and chat JSONL under bench/out/, then runs each job in a fresh
process, ours and the baseline's, sampling the whole process tree's RSS (workers included) every
20 ms. Prints a Markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
WORDS = (
    "antrea agent proxy service endpoint flow bridge policy egress ingress node pod cluster tunnel "
    "windows cni ipam gateway traceflow restart crash timeout packet drop mtu kubelet containerd"
).split()
LABELS = ["agent", "antctl", "cni", "multi-cluster", "network-policy", "ovs", "proxy", "windows"]


def generate(n: int) -> tuple[Path, Path]:
    OUT.mkdir(exist_ok=True)
    seed_path, chat_path = OUT / f"seed_{n}.jsonl", OUT / f"chat_{n}.jsonl"
    if seed_path.exists() and chat_path.exists():
        return seed_path, chat_path
    rng = random.Random(0)
    with open(seed_path, "w") as fs, open(chat_path, "w") as fc:
        for i in range(n):
            title = " ".join(rng.choices(WORDS, k=8))
            body = " ".join(rng.choices(WORDS, k=rng.randint(40, 120)))
            labels = rng.sample(LABELS, k=rng.choice((1, 1, 1, 2)))
            human = f"title: {title} #{i} body: {body}"
            fs.write(
                json.dumps(
                    {
                        "id": f"identity_{i}",
                        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": str(labels)}],
                    }
                )
                + "\n"
            )
            fc.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": "You label issues."},
                            {"role": "user", "content": human},
                            {"role": "assistant", "content": ",".join(f"'{x}'" for x in labels)},
                        ]
                    }
                )
                + "\n"
            )
    return seed_path, chat_path


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak memory (MB) of the whole process tree, as the sum of each process's
    PSS: pages shared between a parent and its forked workers count once, not once per process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return wall, peak / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--jobs", default="prepare,validate,stats,stats-local")
    args = ap.parse_args()
    seed_path, chat_path = generate(args.examples)
    py = sys.executable
    base = [py, str(HERE / "cookbook_baseline.py")]
    ours = [py, "-m", "gpt_finetune"]
    cases = {
        "prepare": (
            [
                *ours,
                "prepare",
                "-i",
                str(seed_path),
                "-o",
                str(OUT / "ours.jsonl"),
                "--sys-prompt",
                "You label issues.",
            ],
            [*base, "prepare", str(seed_path), str(OUT / "base.jsonl")],
        ),
        "validate": ([*ours, "validate", str(chat_path)], [*base, "validate", str(chat_path)]),
        "stats": ([*ours, "stats", str(chat_path), "--no-local"], [*base, "stats", str(chat_path)]),
        # the local model's counts in the same pass, against our own OpenAI-only stats
        "stats-local": ([*ours, "stats", str(chat_path)], [*ours, "stats", str(chat_path), "--no-local"]),
    }
    print(f"{args.examples:,} examples; {os.cpu_count()} cores; chat file {chat_path.stat().st_size / 1e6:.0f} MB\n")
    print("(stats-local: the baseline is our own stats --no-local, ours is stats with the local counts)\n")
    print("| job | baseline ex/s | ours ex/s | speed-up | baseline peak memory | ours peak memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for job in args.jobs.split(","):
        ours_cmd, base_cmd = cases[job]
        bw, bm = measure(base_cmd)
        ow, om = measure(ours_cmd)
        n = args.examples
        print(f"| {job} | {n / bw:,.0f} | {n / ow:,.0f} | {bw / ow:.2f}x | {bm:,.0f} MB | {om:,.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
