"""One job on two processes: ``accelerate launch`` on one machine against a Ray Train run of two
workers (README "Training on a Ray cluster"), with one process as the reference, on real issues.

Each run is the product as a user runs it: a fresh data directory, a real ``gpt-finetune
worker`` process (``--executor ray`` for the Ray run, against a Ray head this script starts),
and a job of the default model on the same prepared issues with the same seed. Measured from
the job's own events and the store: the time from creation to the first training step (what
launching costs: processes, rendezvous, loading the model), the training time and tokens per
second, the whole wall time, the final training loss, the largest weight difference from the
one-process adapter, and the peak resident memory of the training processes (and of Ray's own
processes, for the Ray run).

    python bench/ray_dp.py                                   # 64 issues of the sample, 1 epoch
    python bench/ray_dp.py --examples 128 --runs one,accelerate,ray
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data" / "nlbse24_sample.json"
RAY = str(Path(sys.executable).parent / "ray")


def rss_sampler(stop: threading.Event, peaks: dict[str, int]) -> None:
    """Every half second, the summed resident size of the training processes and of Ray's."""
    import psutil

    while not stop.is_set():
        train = ray = 0
        for p in psutil.process_iter(["cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            rss = p.info["memory_info"].rss if p.info["memory_info"] else 0
            if "gpt_finetune.worker.train_job" in cmd and "accelerate.commands.launch" not in cmd:
                train += rss  # the training processes (not accelerate's launcher, which only waits)
            elif any(k in cmd for k in ("raylet", "gcs_server", "ray::", "dashboard", "gpt_finetune.worker.ray_train")):
                ray += rss  # Ray's own processes, its actors, and the Ray Train driver
        peaks.setdefault("ray_idle", ray)  # before the job: the head alone
        peaks["train"] = max(peaks.get("train", 0), train)
        peaks["ray"] = max(peaks.get("ray", 0), ray)
        stop.wait(0.5)


def run(name: str, train_file: Path, work: Path, args: argparse.Namespace, head: str | None) -> dict[str, Any]:
    from test_workers import _wait

    from gpt_finetune.backends.base import Hyperparameters
    from gpt_finetune.backends.local import LocalBackend
    from gpt_finetune.services import Services

    home = work / name
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "gpt_finetune", "worker", "--home", str(home)]
    if name == "ray":
        cmd += ["--executor", "ray", "--ray-address", str(head)]
    log = open(work / f"{name}.log", "wb")
    worker = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    services = Services.open(home)
    _wait("the worker's registration", lambda: services.workers.live("worker"), 120)
    options = {"num_processes": 1 if name == "one" else 2, "lora_dropout": 0.0, "max_length": args.max_length}
    backend = LocalBackend(services, options)
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=rss_sampler, args=(stop, peaks), daemon=True)
    sampler.start()
    fid = backend.upload_file(train_file).id
    job = backend.create_job(
        model="SmolLM2-135M-Instruct",
        training_file=fid,
        seed=3,
        hyperparameters=Hyperparameters(n_epochs=args.epochs, batch_size=args.batch_size),
    )
    while (j := backend.retrieve_job(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
    stop.set()
    sampler.join()
    worker.terminate()
    worker.wait(60)
    assert j.status == "succeeded", (j.error, (work / f"{name}.log").read_text()[-2000:])
    events = list(reversed(backend.list_events(job.id, limit=10_000)))
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    started = next(e for e in events if e.message.startswith("Training "))
    row = services.jobs.row(job.id)
    train_s = row["finished_at"] - metrics[0].created_at if metrics else float("nan")
    return {
        "run": name,
        "started": started.message,
        "to_first_step_s": metrics[0].created_at - row["created_at"],
        "train_s": train_s,
        "wall_s": row["finished_at"] - row["created_at"],
        "trained_tokens": row["trained_tokens"],
        "tokens_per_s": row["trained_tokens"] / max(row["finished_at"] - started.created_at, 1),
        "final_train_loss": metrics[-1].data["train_loss"],
        "steps": metrics[-1].data["step"],
        "peak_train_rss_gb": peaks.get("train", 0) / 1e9,
        "peak_ray_rss_gb": peaks.get("ray", 0) / 1e9,
        "ray_idle_rss_gb": peaks.get("ray_idle", 0) / 1e9,
        "adapter": str(services.home.model_dir(job.id) / "adapter_model.safetensors"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=64, help="training issues from the sample")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--runs", default="one,accelerate,ray")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "ray_dp.json"))
    args = ap.parse_args()
    from gpt_finetune.data.convert import ConvertOptions
    from gpt_finetune.data.prepare import prepare
    from gpt_finetune.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="ray-dp-"))
    cfg = load_settings({}, config_file=ROOT / "examples" / "data_process.cfg", env={}, default_config=work / "x")
    prepare(
        DATA,
        work / "all.jsonl",
        split=0.2,
        seed=0,
        options=ConvertOptions(sys_prompt=cfg.sys_prompt, task_type="classification"),
    )
    lines = (work / "all.jsonl").read_text().splitlines()[: args.examples]
    train_file = work / "train.jsonl"
    train_file.write_text("\n".join(lines) + "\n")
    # one converted base model for every run (the first would pay the conversion otherwise)
    os.environ["GPT_FINETUNE_MODEL_CACHE"] = str(work / "model-cache")
    from gpt_finetune.home import Home
    from gpt_finetune.local.base_weights import model_dir, resolve_base

    model_dir(resolve_base("SmolLM2-135M-Instruct"), Home(work / "warm"))
    head = None
    if "ray" in args.runs:
        from test_server import free_port

        port, dash = free_port(), free_port()
        start = [RAY, "start", "--head", "--num-cpus", "2", "--port", str(port), "--dashboard-port", str(dash)]
        subprocess.run(
            [*start, "--dashboard-host", "127.0.0.1", "--disable-usage-stats"],
            check=True,
            capture_output=True,
            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
        )
        head = f"http://127.0.0.1:{dash}"
        time.sleep(5)
    results = []
    try:
        for name in args.runs.split(","):
            r = run(name, train_file, work, args, head)
            print(json.dumps({k: v for k, v in r.items() if k != "adapter"}), flush=True)
            results.append(r)
    finally:
        if head:
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
    from safetensors.torch import load_file

    ref = load_file(results[0]["adapter"])
    for r in results:
        w = load_file(r.pop("adapter"))
        r["max_weight_diff_vs_first"] = max(float((w[k] - ref[k]).abs().max()) for k in ref)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
