"""One job's training process, started by the runner (or by ``accelerate launch``).

Reads the job from the store, trains (``trainer.train``), and records what happens as OpenAI
does: metrics and message events, checkpoints with model ids, the result CSV, the fine-tuned
model. With several processes only rank 0 writes. Python errors fail the job with their message;
a hard crash (a signal) is left to the runner, which resumes the job from its last checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..base_catalog import resolve_base
from ..contract import JobSpec, JobStatus
from ..errors import GptFinetuneError
from ..local.base_weights import model_dir as base_model_dir
from ..local.base_weights import needs_conversion
from ..services import Services
from ..services.models import fine_tuned_id
from .allocator import prepare_process

RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
# a DPO job's result file: its loss and TRL's figures, for training and validation
DPO_FIGURES = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
DPO_RESULT_COLUMNS = ["step", "train_loss", *DPO_FIGURES, "valid_loss", *(f"valid_{k}" for k in DPO_FIGURES)]


def latest_checkpoint(output_dir: Path) -> str | None:
    found = []
    for p in output_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), str(p)))
    return max(found)[1] if found else None


def result_csv(services: Services, job_id: str, method: str = "supervised") -> str:
    """OpenAI's result file, from the job's metrics events (so it survives a resume)."""
    rows: dict[int, dict[str, Any]] = {}
    columns = DPO_RESULT_COLUMNS if method == "dpo" else RESULT_COLUMNS
    for d in services.jobs.metrics_rows(job_id):
        row = rows.setdefault(int(d["step"]), {"step": int(d["step"])})
        if method == "dpo":
            row.update({k: d[k] for k in columns if d.get(k) is not None})
            continue
        row.update(
            {
                "train_loss": d.get("train_loss", row.get("train_loss")),
                "train_accuracy": d.get("train_mean_token_accuracy", row.get("train_accuracy")),
                "valid_loss": d.get("valid_loss", row.get("valid_loss")),
                "valid_mean_token_accuracy": d.get("valid_mean_token_accuracy", row.get("valid_mean_token_accuracy")),
            }
        )
    out = io.StringIO()
    w = csv.DictWriter(out, columns, lineterminator="\n")
    w.writeheader()
    for step in sorted(rows):
        w.writerow({k: ("" if rows[step].get(k) is None else rows[step][k]) for k in columns})
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpt_finetune.worker.train_job")
    ap.add_argument("--home", required=True)
    ap.add_argument("--runner-pid", type=int, default=0, help="stop when this process is gone")
    ap.add_argument("--worker-id", default=None, help="stop when another worker holds the job")
    ap.add_argument("--attempt", type=int, default=None, help="stop when the job is in another attempt")
    ap.add_argument("job_id")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # accelerate's launcher numbers the processes
    services = Services.open(args.home)  # the model cache from the environment (settings.from_env)
    jobs = services.jobs
    job = jobs.row(args.job_id)
    is_main = rank == 0
    try:
        return _run(services, job, is_main, args.runner_pid, args.worker_id, args.attempt)
    except GptFinetuneError as exc:  # a known reason (not enough memory, no trainable example)
        if is_main:
            jobs.fail(job["id"], exc.code, exc.message + (f" ({exc.hint})" if exc.hint else ""))
        return 1
    except Exception as exc:
        if is_main:
            traceback.print_exc()
            jobs.fail(job["id"], "training_error", f"{type(exc).__name__}: {exc}")
        return 1


def _base_dir(base: Any, home: Any) -> str:
    """The base model's directory, converted from its GGUF file in a child process the first
    time. The conversion holds two float32 copies of the model; done in this process, the
    allocator keeps that memory after it is freed, and the memory plan, which counts this
    process's resident size before loading as static, would plan small micro-batches for the
    whole job (seen on a fresh data directory: micro-batches of 1,093 tokens, checkpointed,
    instead of 2,046, at twice the time a step)."""
    if needs_conversion(base, home):
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(target=base_model_dir, args=(base, home))
        child.start()
        child.join()
        # a failed child leaves nothing converted: the call below converts here and raises the
        # real error, with its message, for the job's events
    return base_model_dir(base, home)


def _run(
    services: Services,
    job: dict[str, Any],
    is_main: bool,
    runner_pid: int = 0,
    worker_id: str | None = None,
    attempt: int | None = None,
) -> int:
    from ..local.trainer import Hooks, TrainSpec, train

    jobs, home = services.jobs, services.home
    job_id = job["id"]
    spec = JobSpec.from_row(job)  # resolved when the files were checked
    hp, local = spec.hyperparameters, spec.local
    base = resolve_base(spec.base)
    if is_main and job["attempts"] == 1:
        jobs.event(job_id, "Fine-tuning job started")
    allocator, preload_warning = prepare_process()
    if preload_warning and is_main:
        jobs.event(job_id, preload_warning, level="warn")
    mdir = _base_dir(base, home)
    out_dir = home.job_dir(job_id) / "checkpoints"
    final_dir = home.model_dir(job_id)
    train_spec = TrainSpec(
        model_dir=mdir,
        training_file=str(services.files.path(job["training_file"])),
        validation_file=str(services.files.path(job["validation_file"])) if job["validation_file"] else None,
        output_dir=str(out_dir),
        final_dir=str(final_dir),
        n_epochs=int(hp.n_epochs),
        batch_size=int(hp.batch_size),
        learning_rate=local.model.learning_rate_for(spec.method) * float(hp.learning_rate_multiplier),
        method=spec.method,
        init_adapter=spec.init_adapter,
        beta=float(getattr(hp, "beta", 0.1)),
        seed=int(job["seed"]),
        training_type=local.model.training_type,
        lora=local.lora,
        max_length=local.model.max_length,
        checkpoint_every_steps=local.run.checkpoint_every_steps or 0,
        log_every_steps=local.run.log_every_steps or 0,
        resume_from=latest_checkpoint(out_dir),
        torch_compile=local.model.torch_compile,
        gradient_checkpointing=local.memory.gradient_checkpointing,
        memory_limit_gb=local.memory.memory_limit_gb,
        micro_batch_tokens=local.memory.micro_batch_tokens,
        plan=job.get("plan"),  # made at the first start; a resumed job keeps it
        allocator=allocator,
    )
    model_id = fine_tuned_id(base.id, job["suffix"], job_id)
    base_name = spec.base
    last_poll = [0.0, False]

    def should_stop() -> bool:
        if time.time() - last_poll[0] < 1.0:
            return bool(last_poll[1])
        last_poll[0] = time.time()
        # stopped (cancelled, paused), or its lease lapsed and another worker took it
        stop = not jobs.holds(job_id, worker_id, attempt) if worker_id else jobs.status(job_id) != JobStatus.RUNNING
        if runner_pid and not stop:
            try:
                os.kill(runner_pid, 0)
            except ProcessLookupError:
                stop = True  # our runner is gone; the next one resumes this job
        last_poll[1] = stop
        return stop

    def on_metrics(m: dict[str, Any]) -> None:
        parts = [f"Step {m['step']}/{m['total_steps']}"]
        for key in ("train_loss", "valid_loss", "train_mean_token_accuracy", "rewards/margins", "rewards/accuracies"):
            if key in m:
                parts.append(f"{key}={m[key]:.4f}")
        jobs.event(job_id, ": ".join([parts[0], ", ".join(parts[1:])]), type="metrics", data=m)

    def on_checkpoint(step: int, path: str, metrics: dict[str, Any]) -> None:
        jobs.add_checkpoint(job_id, step=step, path=path, metrics=metrics, model_id=model_id, base=base_name)

    hooks = Hooks(
        on_metrics=on_metrics,
        on_checkpoint=on_checkpoint,
        on_message=lambda text: jobs.event(job_id, text),
        should_stop=should_stop,
        save_on_stop=lambda: jobs.status(job_id) == JobStatus.PAUSED,
        on_plan=lambda plan: jobs.set_plan(job_id, plan),
    )
    if not is_main:
        hooks = Hooks(should_stop=should_stop)
    result = train(train_spec, hooks)
    if not is_main:
        return 0
    if result.stopped:  # cancelled or paused (the status says so already), or the runner went away
        if jobs.status(job_id) == JobStatus.PAUSED:
            jobs.event(job_id, f"Job paused at step {result.global_step}; resume continues from there")
        return 0
    if result.full_valid_loss is not None:
        m = {"step": result.global_step, "total_steps": result.global_step, "full_valid_loss": result.full_valid_loss}
        if result.full_valid_mean_token_accuracy is not None:
            m["full_valid_mean_token_accuracy"] = result.full_valid_mean_token_accuracy
        jobs.event(job_id, f"Full validation loss: {result.full_valid_loss:.4f}", type="metrics", data=m)
    result_path = home.job_dir(job_id) / "result.csv"
    from ..atomic import write_text_atomic

    write_text_atomic(result_path, result_csv(services, job_id, spec.method))
    if not jobs.complete(
        job_id,
        model_id=model_id,
        base=base_name,
        model_path=str(final_dir),
        trained_tokens=result.trained_tokens,
        result_path=str(result_path),
        held_by=worker_id,
        attempt=attempt,
    ):
        # cancelled at the last moment: the model is not kept. Held by another worker now (this
        # one's lease lapsed): the directory is that worker's to write
        if jobs.status(job_id) not in (JobStatus.RUNNING, JobStatus.SUCCEEDED):
            shutil.rmtree(final_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
