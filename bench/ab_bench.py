"""Two commits side by side, interleaved, in one invocation: did a change move the speed?

    python bench/ab_bench.py --commits 25a43eb,HEAD --data ../shared/data/nlbse24_sample.json \
        --sys-prompt "Label the GitHub issue as bug, feature or question." --max-steps 8 --rounds 2

Each commit's ``src/`` and ``bench/`` are extracted (``git archive``) under ``bench/out/ab/``, and
each measurement runs in a fresh process with ``PYTHONPATH`` on that copy, so each commit runs its
own code: training (``train_bench.py``'s ``ours`` run: a job's trainer with its defaults, the
allocator jobs preload, on the same prepared real issues, the first ``--max-steps`` steps) and the
data jobs (``validate`` and ``stats --no-local`` of ``data_bench.py``'s generated chat file).
Rounds alternate the commits (A B A B ...), so a drift of the machine hits both alike; the spread
of one commit's rounds is the noise a difference between commits has to exceed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "ab"


def extract(commit: str) -> tuple[str, Path]:
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True, check=True)
    short = sha.stdout.strip()
    target = OUT / short
    if not (target / "src" / "gpt_finetune").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as fh:
            subprocess.run(["git", "archive", short, "src", "bench"], cwd=ROOT, stdout=fh, check=True)
            fh.seek(0)
            with tarfile.open(fileobj=fh) as tar:
                tar.extractall(target, filter="data")
    return short, target


def env_for(copy: Path) -> dict[str, str]:
    from gpt_finetune.worker.allocator import allocator_env

    env = dict(os.environ, PYTHONPATH=str(copy / "src"), TOKENIZERS_PARALLELISM="false")
    env.update(allocator_env(env, os.environ.get("GPT_FINETUNE_MALLOC")))  # as jobs start, for both
    return env


def train_once(copy: Path, model_dir: str, train_file: Path, work: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(copy / "bench" / "train_bench.py"),
        "--max-steps",
        str(args.max_steps),
        "--child",
        "ours",
        model_dir,
        str(train_file),
        str(work),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_for(copy), cwd=copy)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    return out


def data_once(copy: Path, job: str, chat: Path, n: int) -> float:
    cmd = [sys.executable, "-m", "gpt_finetune", job, str(chat)] + (["--no-local"] if job == "stats" else [])
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, env=env_for(copy), cwd=copy, check=True)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", required=True, help="A,B: the commit before a change and after it")
    ap.add_argument("--data", required=True, help="raw data (seed JSON) to train on")
    ap.add_argument("--sys-prompt", required=True)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--examples", type=int, default=200_000, help="size of the data jobs' file")
    ap.add_argument("--only", choices=["train", "data"], help="run only the training or only the data jobs")
    args = ap.parse_args()

    from gpt_finetune.data.convert import ConvertOptions
    from gpt_finetune.data.prepare import prepare
    from gpt_finetune.home import Home
    from gpt_finetune.local.base_weights import model_dir as base_dir
    from gpt_finetune.local.base_weights import resolve_base

    sys.path.insert(0, str(HERE))
    from data_bench import generate

    commits = [extract(c) for c in args.commits.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / "work" / Path(args.data).stem  # prepared once per data file
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.jsonl"
    if not train_file.is_file():
        prepare(
            Path(args.data),
            train_file,
            split=0.2,
            seed=0,
            options=ConvertOptions(sys_prompt=args.sys_prompt, task_type="classification"),
        )
    model_dir = base_dir(resolve_base("SmolLM2-135M-Instruct"), Home())
    _, chat = generate(args.examples)
    results: dict[str, dict[str, list[float]]] = {short: {} for short, _ in commits}
    for r in range(args.rounds):
        for short, copy in commits if r % 2 == 0 else commits[::-1]:
            if args.only != "data":
                t = train_once(copy, model_dir, train_file, work / f"{short}-{r}", args)
                results[short].setdefault("train", []).append(t["tokens_per_s"])
                results[short].setdefault("peak", []).append(t["peak_rss_mb"])
            if args.only != "train":
                for job in ("validate", "stats"):
                    results[short].setdefault(job, []).append(data_once(copy, job, chat, args.examples))
            print(f"round {r + 1}, {short}: {json.dumps({k: v[-1] for k, v in results[short].items()})}", flush=True)
    (OUT / f"ab_bench{'-' + args.only if args.only else ''}.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1)
    )

    def cell(values: list[float], unit: str = "") -> str:
        return f"{statistics.mean(values):,.1f}{unit} ({min(values):,.1f} to {max(values):,.1f})"

    a, b = (short for short, _ in commits)
    print(
        f"\n{args.max_steps} training steps on {args.data}; data jobs on {args.examples:,} examples; "
        f"{args.rounds} rounds, interleaved\n"
    )
    print(f"| measure | {a} (before) | {b} (after) | after / before | spread of one commit's rounds |")
    print("|---|---:|---:|---:|---:|")
    names = {
        "train": "training, real tokens/s",
        "peak": "training peak RSS, MB",
        "validate": "validate, ex/s",
        "stats": "stats --no-local, ex/s",
    }
    for key, name in names.items():
        if key not in results[a]:
            continue
        ra, rb = results[a][key], results[b][key]
        spread = max((max(v) - min(v)) / statistics.mean(v) for v in (ra, rb))
        ratio = statistics.mean(rb) / statistics.mean(ra)
        print(f"| {name} | {cell(ra)} | {cell(rb)} | {ratio:.3f} | {spread * 100:.1f} % |")


if __name__ == "__main__":
    main()
