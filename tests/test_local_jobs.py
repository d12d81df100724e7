"""Jobs on the local backend: the detached worker, OpenAI's job semantics, cancel, crash recovery,
and the seed's scripts end to end. The model is a tiny Llama built in the test."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("trl")

from conftest import ROOT, chat_example, toy_examples, write_jsonl

from gpt_finetune.backends.base import Hyperparameters
from gpt_finetune.backends.local import LocalBackend
from gpt_finetune.contract import DpoHyperparameters
from gpt_finetune.services import Services
from gpt_finetune.worker.allocator import KINDS, allocator_env


def backend(home, **options):
    return LocalBackend(Services.open(home), {"log_every_steps": 1, **options})


def wait_for(predicate, timeout=180, what="condition", state=None):
    """``state``: what to show on a timeout (a job's status and last events), so that a slow
    machine and a stuck job can be told apart from the failure alone."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}" + (f"; {state()}" if state else ""))


def job_state(b, job_id):
    def describe():
        job = b.retrieve_job(job_id)
        events = [e.message for e in b.list_events(job_id, limit=6)]
        return f"job {job.status}, runner processes {runner_pids(b.services.home.root)}, last events {events}"

    return describe


def upload(b, tmp_path, rows, name="train.jsonl"):
    return b.upload_file(write_jsonl(tmp_path / name, rows)).id


def runner_pids(home):
    out = subprocess.run(
        ["pgrep", "-f", f"gpt_finetune.worker.(runner|train_job) --home {home}"], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


def test_job_lifecycle_events_checkpoints_result_file_and_model(tmp_path, tiny_model_dir, isolated_home):
    b = backend(isolated_home, training_type="full")
    train_id = upload(b, tmp_path, toy_examples(20))
    valid_id = upload(b, tmp_path, toy_examples(8), "valid.jsonl")
    job = b.create_job(
        model=str(tiny_model_dir),
        training_file=train_id,
        validation_file=valid_id,
        hyperparameters=Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=40),
        suffix="toy",
        seed=7,
    )
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 2  # checked by the runner
    done = wait_for(lambda: (j := b.retrieve_job(job.id)).status in ("succeeded", "failed") and j, what="job end")
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny-llama:toy:{job.id}"
    events = list(reversed(b.list_events(job.id)))
    messages = [e.message for e in events]
    assert messages[0] == f"{tiny_model_dir} is trained locally as base model tiny-llama"
    assert messages[1].startswith("Validating training file") and "successfully completed" in messages[-1]
    # the runner starts training on a caching allocator: the system's, else the pip-installed mimalloc
    preload = allocator_env(dict(os.environ)).get("LD_PRELOAD", os.environ.get("LD_PRELOAD", ""))
    expected = next((name for name in KINDS if name in preload), "system")
    assert any(m.startswith("Training ") and f", {expected} allocator)" in m for m in messages), messages
    metrics = [e.data for e in events if e.type == "metrics"]
    assert {"step", "total_steps", "train_loss", "train_mean_token_accuracy"} <= metrics[0].keys()
    assert any("valid_loss" in m for m in metrics) and any("full_valid_loss" in m for m in metrics)
    assert metrics[-2]["step"] == metrics[-2]["total_steps"] == 10
    ckpts = b.list_checkpoints(job.id)
    assert [c.step_number for c in ckpts] == [10, 5]  # one per epoch, newest first
    assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-10"
    result_path = b.services.files.path(done.result_files[0])
    rows = list(csv.DictReader(open(result_path)))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert done.fine_tuned_model in [m.id for m in b.list_models()]
    msgs = [{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": "thing 2"}]
    tuned = b.chat(model=done.fine_tuned_model, messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    ckpt = (
        b.chat(model=ckpts[1].fine_tuned_model_checkpoint, messages=msgs, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
    )
    base = b.chat(model=str(tiny_model_dir), messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    assert tuned != base and ckpt != base  # the checkpoint answers from its own, trained weights
    wait_for(lambda: not runner_pids(isolated_home), timeout=30, what="the runner to exit")
    # deleting the model frees its disk
    model_dir = b.services.home.model_dir(job.id)
    assert model_dir.is_dir()
    assert b.delete_model(done.fine_tuned_model)
    assert not model_dir.exists() and done.fine_tuned_model not in [m.id for m in b.list_models()]


def test_bad_training_file_fails_with_openai_codes(tmp_path, tiny_model_dir, isolated_home):
    b = backend(isolated_home)
    rows = [chat_example(i) for i in range(12)]
    rows[6] = {"messages": [{"role": "user", "content": "no answer"}]}
    job = b.create_job(model=str(tiny_model_dir), training_file=upload(b, tmp_path, rows))
    assert job.status == "validating_files"  # as OpenAI: files are checked after the job is created
    few = b.create_job(model=str(tiny_model_dir), training_file=upload(b, tmp_path, rows[:5], "few.jsonl"))
    ended = lambda j: (r := b.retrieve_job(j.id)).status != "validating_files" and r  # noqa: E731
    job, few = wait_for(lambda: ended(job), what="check"), wait_for(lambda: ended(few), what="check")
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "line 7" in job.error.message and "assistant" in job.error.message
    assert few.status == "failed" and few.error.code == "invalid_n_examples"
    assert any("validation failed" in e.message for e in b.list_events(job.id))
    wait_for(lambda: runner_pids(isolated_home) == [], timeout=30, what="the runner to exit")


def test_jobs_list_pages_and_hyperparameter_ranges(tmp_path, tiny_model_dir, isolated_home):
    from gpt_finetune.errors import BackendError

    b = backend(isolated_home)
    fid = upload(b, tmp_path, [chat_example(i) for i in range(3)])
    ids = [b.create_job(model=str(tiny_model_dir), training_file=fid).id for _ in range(3)]  # all fail: too few
    page1 = b.list_jobs(limit=2)
    page2 = b.list_jobs(limit=2, after=page1[-1].id)
    assert [j.id for j in page1 + page2] == list(reversed(ids))
    with pytest.raises(BackendError, match="n_epochs"):
        b.create_job(model=str(tiny_model_dir), training_file=fid, hyperparameters=Hyperparameters(n_epochs=51))


def test_cancel_stops_the_worker_within_seconds(tmp_path, tiny_model_dir, isolated_home):
    b = backend(isolated_home)
    job = b.create_job(
        model=str(tiny_model_dir),
        training_file=upload(b, tmp_path, toy_examples(40)),
        hyperparameters=Hyperparameters(n_epochs=50, batch_size=1),
    )
    wait_for(lambda: any(e.type == "metrics" for e in b.list_events(job.id)), what="training to start")
    assert b.cancel_job(job.id).status == "cancelled"
    t0 = time.time()
    wait_for(lambda: not runner_pids(isolated_home), timeout=30, what="the worker to stop")
    assert time.time() - t0 < 15
    final = b.retrieve_job(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    from gpt_finetune.errors import BackendError

    with pytest.raises(BackendError, match="cannot be cancelled"):
        b.cancel_job(job.id)


def test_killed_worker_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, isolated_home):
    b = backend(isolated_home, checkpoint_every_steps=4)
    job = b.create_job(
        model=str(tiny_model_dir),
        training_file=upload(b, tmp_path, toy_examples(16)),
        hyperparameters=Hyperparameters(n_epochs=6, batch_size=2),
    )
    wait_for(lambda: b.list_checkpoints(job.id), what="a checkpoint")
    runner = b.services.jobs.row(job.id)["worker_pid"]
    os.killpg(runner, signal.SIGKILL)  # the runner and its training child, as a power cut would
    wait_for(lambda: not runner_pids(isolated_home), timeout=20, what="the processes to die")
    assert b.services.jobs.row(job.id)["status"] == "running"  # nobody has noticed yet (retrieve would)
    # the plan made at the first start is what the resumed attempt trains with, not a new one
    plan = b.services.jobs.row(job.id)["plan"]
    assert plan and plan["checkpointing"] in ("off", "auto")
    plan["budget_bytes"] = plan["per_token_bytes"] * 777
    b.services.jobs.set_plan(job.id, plan)
    b2 = backend(isolated_home)  # any later start of the local backend recovers it
    done = wait_for(
        lambda: (j := b2.retrieve_job(job.id)).status in ("succeeded", "failed") and j,
        timeout=300,
        what="job end",
        state=job_state(b2, job.id),
    )
    assert done.status == "succeeded", done.error
    messages = [e.message for e in b2.list_events(job.id, limit=1000)]
    assert any("will resume from its last checkpoint" in m for m in messages)
    assert any(m.startswith("Resuming from checkpoint checkpoint-") for m in messages)
    assert b2.services.jobs.row(job.id)["attempts"] == 2
    plans = [m for m in messages if m.startswith("Memory plan:")]
    assert len(plans) == 2 and "up to 777 tokens" in plans[0]  # newest first: the resumed attempt's


def test_memory_and_allocator_settings_reach_the_job(tmp_path, tiny_model_dir, isolated_home, monkeypatch):
    """gradient_checkpointing and memory_limit_gb go from the settings through the backend to the
    worker's plan: stated in the events, stored with the job; a job that cannot fit fails at once.
    An allocator that cannot be preloaded (``malloc``) is a warning, and the job trains on glibc's."""
    missing = str(tmp_path / "libnot-there.so")
    monkeypatch.setenv("GPT_FINETUNE_MALLOC", missing)  # read by the runner the backend starts
    b = backend(isolated_home, gradient_checkpointing=True)
    job = b.create_job(
        model=str(tiny_model_dir),
        training_file=upload(b, tmp_path, toy_examples(12)),
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=4),
    )
    done = wait_for(lambda: (j := b.retrieve_job(job.id)).status in ("succeeded", "failed") and j, what="job end")
    assert done.status == "succeeded", done.error
    assert b.services.jobs.row(job.id)["plan"]["checkpointing"] == "on"
    plan_msg = [e.message for e in b.list_events(job.id, limit=100) if e.message.startswith("Memory plan:")]
    assert len(plan_msg) == 1 and "activation checkpointing on" in plan_msg[0] and "estimated peak" in plan_msg[0]
    events = b.list_events(job.id, limit=100)
    warned = [e for e in events if e.message.startswith("Could not preload the allocator")]
    assert len(warned) == 1 and warned[0].level == "warn" and missing in warned[0].message
    assert any(e.message.startswith("Training ") and ", system allocator)" in e.message for e in events)

    small = backend(isolated_home, memory_limit_gb=0.5)  # less than the runtime alone
    job = small.create_job(
        model=str(tiny_model_dir),
        training_file=upload(small, tmp_path, toy_examples(12)),
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=4),
    )
    done = wait_for(lambda: (j := small.retrieve_job(job.id)).status in ("succeeded", "failed") and j, what="job end")
    assert done.status == "failed" and done.error.code == "insufficient_memory"
    assert "not enough memory to train" in done.error.message and "0.50 GB" in done.error.message
    assert not b.list_checkpoints(job.id)  # failed before the first step


def test_a_job_that_keeps_dying_fails_clearly(tmp_path, tiny_model_dir, isolated_home):
    b = backend(isolated_home)
    fid = upload(b, tmp_path, toy_examples(12))
    job = b.services.jobs.create(model=str(tiny_model_dir), training_file=fid, start=False)
    b.services.store.update("jobs", job["id"], {"status": "running", "attempts": 3})  # died three times
    backend(isolated_home)
    done = wait_for(lambda: (j := b.retrieve_job(job["id"])).status != "running" and j, timeout=30, what="failure")
    assert done.status == "failed" and done.error.code == "worker_died" and "3 times" in done.error.message


def test_seed_scripts_end_to_end_on_the_local_backend(tmp_path, tiny_model_dir, isolated_home):
    env = dict(os.environ, GPT_FINETUNE_LOG_EVERY_STEPS="1", GPT_FINETUNE_TRAINING_TYPE="full")
    data = write_jsonl(tmp_path / "output.jsonl", toy_examples(12))
    cfg = tmp_path / "train.cfg"
    cfg.write_text(
        f"openai_api_key = <openai_api_key>\ntraining_file = {data}\nmodel = {tiny_model_dir}\n"
        "n_epochs = 2\nbatch_size = 4\nlearning_rate_multiplier = 40\nvalidation_file = <validation_file>\n"
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert job_id.startswith("ftjob-") and "Using the local backend" in r.stderr
    w = subprocess.run(
        [sys.executable, "-m", "gpt_finetune", "jobs", "wait", job_id],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert w.returncode == 0 and "succeeded" in w.stderr, w.stderr
    q = subprocess.run(
        [
            sys.executable,
            str(ROOT / "infer.py"),
            "--job",
            job_id,
            "-q",
            "thing 3",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "-s",
            "Answer with a colour.",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert q.returncode == 0, q.stderr
    s = json.loads(
        subprocess.run(
            [sys.executable, "-m", "gpt_finetune", "jobs", "get", job_id, "--json"],
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    )
    assert s["status"] == "succeeded" and s["hyperparameters"]["n_epochs"] == 2
    # infer.py --job answered with the job's fine-tuned model, as the backend does for that model
    msgs = [{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": "thing 3"}]
    direct = backend(isolated_home).chat(model=s["fine_tuned_model"], messages=msgs, max_tokens=6, temperature=0)
    assert q.stdout.strip() == (direct.choices[0].message.content or "").strip() != ""
    png = tmp_path / "curves.png"
    p = subprocess.run(
        [sys.executable, "-m", "gpt_finetune", "jobs", "plot", job_id, "-o", str(png)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_quickstart_runs_on_the_local_backend_whatever_keys_are_set(tmp_path, capsys, monkeypatch, tiny_model_dir):
    from gpt_finetune.cli.main import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-quickstart-must-not-use-this-key")
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--model", str(tiny_model_dir), "--n-epochs", "1", "--show", "3"]) == 0
    out, err = capsys.readouterr()
    assert "local backend" in err and "sk-quickstart" not in err + out
    assert "Job ftjob-" in err and "succeeded" in err
    assert "Exact label-set match on 20 held-out issues: base " in out and "Macro-F1: base " in out
    assert "TF-IDF + logistic regression 0." in out or "TF-IDF + logistic regression 1." in out
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split() == ["issue", "title", "true", "labels", "base", "model", "fine-tuned"]
    assert len(table) == 2 + 3  # header, rule, --show rows
    work = tmp_path / "quickstart"
    assert len((work / "issues.valid.jsonl").read_text().splitlines()) == 20
    assert (work / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dpo_job_on_a_fine_tuned_model_continues_its_adapter_from_its_own_reference(
    tmp_path, tiny_model_dir, isolated_home
):
    """OpenAI's SFT-then-DPO path: the DPO job starts from the supervised model, whose adapter
    it trains on, and its reference is that model (the first step's loss is ln 2 exactly)."""
    from conftest import toy_pairs
    from safetensors.torch import load_file

    b = backend(isolated_home)
    sft = b.create_job(
        model=str(tiny_model_dir),
        training_file=upload(b, tmp_path, toy_examples(12)),
        hyperparameters=Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=20),
        suffix="sft",
    )
    done = wait_for(lambda: (j := b.retrieve_job(sft.id)).status in ("succeeded", "failed") and j, what="sft end")
    assert done.status == "succeeded", done.error
    dpo = b.create_job(
        model=done.fine_tuned_model,
        training_file=upload(b, tmp_path, toy_pairs(12), "pairs.jsonl"),
        hyperparameters=DpoHyperparameters(n_epochs=1, batch_size=4, beta=0.5),
        suffix="dpo",
        method="dpo",
    )
    ended = wait_for(lambda: (j := b.retrieve_job(dpo.id)).status in ("succeeded", "failed") and j, what="dpo end")
    assert ended.status == "succeeded", ended.error
    assert ended.fine_tuned_model == f"ft:tiny-llama:dpo:{dpo.id}"
    events = list(reversed(b.list_events(dpo.id, limit=200)))
    messages = [e.message for e in events]
    assert messages[0] == f"{done.fine_tuned_model} is trained further: its adapter continues, on base model tiny-llama"
    assert any(
        m.startswith("Continuing the fine-tuned model's adapter (LoRA r 16") for m in messages
    )  # classification defaults
    first = next(e.data for e in events if e.type == "metrics" and "train_loss" in e.data)
    assert first["step"] == 1 and abs(first["train_loss"] - 0.6931) < 1e-3
    home = b.services.home
    before = load_file(home.model_dir(sft.id) / "adapter_model.safetensors")
    after = load_file(home.model_dir(dpo.id) / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not (before[k] == after[k]).all() for k in before)
    # the DPO job's own dropout (none), not the supervised job's the adapter was saved with
    saved = json.loads((home.model_dir(dpo.id) / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.0
    assert json.loads((home.model_dir(sft.id) / "adapter_config.json").read_text())["lora_dropout"] > 0
