"""Two processes train one job together (accelerate, DDP on CPU with gloo) and produce the same
artifacts as one process: the same steps, metrics and adapter weights within tolerance. Examples
of unequal lengths and a small micro-batch budget give the two processes different numbers of
micro-batches in a step: each pads with empty ones, so neither waits for the other forever."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("accelerate")

from conftest import toy_examples, write_jsonl

from gpt_finetune.backends.base import Hyperparameters
from gpt_finetune.backends.local import LocalBackend
from gpt_finetune.services import Services


def run_job(home, tmp_path, model, processes):
    options = {"num_processes": processes, "lora_dropout": 0.0, "log_every_steps": 1, "micro_batch_tokens": 55}
    b = LocalBackend(Services.open(home), options)
    rows = toy_examples(16)
    for i, row in enumerate(rows):
        if i % 3 == 0:  # longer: trains alone; two short ones share a micro-batch
            row["messages"][1]["content"] += " and then some more words about it"
    fid = b.upload_file(write_jsonl(tmp_path / f"train{processes}.jsonl", rows)).id
    job = b.create_job(
        model=str(model),
        training_file=fid,
        seed=11,
        hyperparameters=Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=5),
    )
    deadline = time.time() + 300
    while (j := b.retrieve_job(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, "job did not finish"
        time.sleep(0.5)
    assert j.status == "succeeded", (j.error, (b.services.home.job_dir(job.id) / "train.log").read_text()[-3000:])
    events = list(reversed(b.list_events(job.id, limit=1000)))
    metrics = [e.data for e in events if e.type == "metrics"]
    started = next(e.message for e in events if e.message.startswith("Training "))
    return b.services.home.model_dir(job.id), metrics, started


def test_two_processes_match_one(tmp_path, tiny_model_dir, isolated_home):
    one_dir, one_metrics, one_started = run_job(isolated_home, tmp_path, tiny_model_dir, 1)
    two_dir, two_metrics, two_started = run_job(isolated_home, tmp_path, tiny_model_dir, 2)
    assert "on cpu (" in one_started and "on cpu x2 (" in two_started
    assert one_metrics[-1]["total_steps"] == two_metrics[-1]["total_steps"] == 8
    assert_same_training(one_dir, one_metrics, two_dir, two_metrics)


def assert_same_training(one_dir, one_metrics, two_dir, two_metrics) -> None:
    """The same steps, losses and adapter weights (within float tolerance), and weights that moved."""
    from safetensors.torch import load_file

    assert [m["step"] for m in one_metrics] == [m["step"] for m in two_metrics]
    for a, b in zip(one_metrics, two_metrics):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3, abs=1e-3)
    w1 = load_file(one_dir / "adapter_model.safetensors")
    w2 = load_file(two_dir / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-4, k
    moved = [k for k in w1 if "lora_B" in k and w1[k].abs().max() > 0]
    assert moved  # training happened at all
