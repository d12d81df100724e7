"""Fault injection for the store, the outputs and the worker: a full disk, concurrent processes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, toy_examples, write_jsonl


def test_a_full_disk_during_an_output_write_leaves_every_file_as_it_was(tmp_path, monkeypatch):
    from gpt_finetune import atomic
    from gpt_finetune.data.convert import ConvertOptions
    from gpt_finetune.data.prepare import prepare

    src = write_jsonl(tmp_path / "in.jsonl", toy_examples(20))
    (tmp_path / "out.jsonl").write_text("old output\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        prepare(src, tmp_path / "out.jsonl", split=0.25, options=ConvertOptions(task_type="classification"))
    assert (tmp_path / "out.jsonl").read_text() == "old output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_concurrent_job_creation_and_claims_lose_nothing_and_train_nothing_twice(tmp_path):
    """Two processes create jobs at the same time, then two claim them: every job exists once and
    is claimed by exactly one process."""
    pytest.importorskip("transformers")
    home = tmp_path / "home"
    train = write_jsonl(tmp_path / "train.jsonl", toy_examples(12))
    from gpt_finetune.services import Services

    file_id = Services.open(home).files.create_from_path(train)["id"]
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    script = textwrap.dedent(
        f"""
        import json, sys
        from gpt_finetune.services import Services
        s = Services.open({str(home)!r})
        if sys.argv[1] == "create":
            ids = [s.jobs.create(model={str(model)!r}, training_file={file_id!r}, start=False)["id"] for _ in range(15)]
        else:
            ids = []
            while (job := s.jobs.claim_next(0)) is not None:
                ids.append(job["id"])
        print(json.dumps(ids))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))

    def both(verb):
        procs = [
            subprocess.Popen([sys.executable, "-c", script, verb], stdout=subprocess.PIPE, env=env) for _ in range(2)
        ]
        return [json.loads(p.communicate(timeout=120)[0]) for p in procs]

    created = both("create")
    assert len(created[0]) == len(created[1]) == 15
    every = set(created[0]) | set(created[1])
    assert len(every) == 30
    services = Services.open(home)
    # files are checked asynchronously, by whoever claims jobs next
    assert {r["id"] for r in services.store.query("SELECT id FROM jobs WHERE status = 'validating_files'")} == every
    claimed = both("claim")
    assert sorted(claimed[0] + claimed[1]) == sorted(every)  # each claimed once, none lost
    assert not services.store.query("SELECT id FROM jobs WHERE attempts != 1")


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_fails_the_job_clearly(tmp_path, tiny_model_dir, isolated_home):
    """ENOSPC injected into the worker process (through sitecustomize, not a hook in the code)."""
    pytest.importorskip("trl")
    from gpt_finetune.backends.base import Hyperparameters
    from gpt_finetune.backends.local import LocalBackend
    from gpt_finetune.services import Services

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import errno, os, sys
            if "gpt_finetune.worker.train_job" in sys.orig_argv:  # the runner's training child only
                import torch

                def no_space(*args, **kwargs):
                    raise OSError(errno.ENOSPC, "No space left on device")

                torch.save = no_space  # the optimizer state of every checkpoint goes through it
            """
        )
    )
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(inject) + (os.pathsep + old if old else "")
    try:
        b = LocalBackend(Services.open(isolated_home), {"log_every_steps": 1})
        file_id = b.upload_file(write_jsonl(tmp_path / "t.jsonl", toy_examples(12))).id
        job = b.create_job(
            model=str(tiny_model_dir), training_file=file_id, hyperparameters=Hyperparameters(n_epochs=1, batch_size=4)
        )
        deadline = time.time() + 180
        while (done := b.retrieve_job(job.id)).status not in ("succeeded", "failed") and time.time() < deadline:
            time.sleep(0.3)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    assert done.status == "failed" and "No space left on device" in done.error.message
    assert not b.list_checkpoints(job.id)  # no checkpoint recorded that was not written
    assert b.services.store.query("SELECT count(*) AS n FROM jobs WHERE status = 'running'")[0]["n"] == 0
