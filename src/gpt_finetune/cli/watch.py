"""Follow a job until it ends: one loop for every backend, since all speak OpenAI's shapes.

Message events are printed as they come; metrics events drive a progress bar showing
step/total, loss and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ..contract import STOPPED, JobStatus  # STOPPED: a paused job waits for `jobs resume`


def watch_job(backend: Any, job_id: str, *, poll: float = 2.0, out: Any = None) -> Any:
    from tqdm import tqdm

    out = out or sys.stderr
    seen: set[str] = set()
    bar: Any = None
    job = backend.retrieve_job(job_id)
    try:
        while True:
            events = backend.list_events(job_id, limit=100)
            for event in [e for e in reversed(events) if e.id not in seen]:  # the API lists newest first
                seen.add(event.id)
                data = event.data if isinstance(event.data, dict) else {}
                if event.type == "metrics" and data.get("step") is not None:
                    total = data.get("total_steps")
                    if bar is None:
                        bar = tqdm(total=total, unit="step", file=out, dynamic_ncols=True, desc="training")
                    if total and bar.total != total:
                        bar.total = total
                    bar.n = int(data["step"])
                    post = {}
                    for key, label in (
                        ("train_loss", "loss"),
                        ("valid_loss", "val_loss"),
                        ("train_mean_token_accuracy", "acc"),
                    ):
                        if data.get(key) is not None:
                            post[label] = f"{float(data[key]):.4f}"
                    bar.set_postfix(post, refresh=False)
                    bar.refresh()
                else:
                    line = f"[{event.level}] {event.message}"
                    if bar is not None:
                        bar.write(line, file=out)
                    else:
                        print(line, file=out)
            job = backend.retrieve_job(job_id)
            if job.status in STOPPED:
                break
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()
    if job.status == JobStatus.SUCCEEDED:
        print(f"Job {job.id} succeeded: {job.fine_tuned_model}", file=out)
    else:
        err = f": {job.error.message}" if getattr(job, "error", None) and job.error.message else ""
        print(f"Job {job.id} {job.status}{err}", file=out)
    return job
