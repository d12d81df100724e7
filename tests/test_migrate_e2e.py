"""The whole move through the real console script against a fake OpenAI on a loopback port:
inventory, record killed with -9 and rerun, retrain killed with -9 and rerun, then the retrained
tiny model answers under its old OpenAI id through ``gpt-finetune serve`` and the official
``openai`` client, and compare writes its report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("trl")
pytest.importorskip("fastapi")

from conftest import ROOT, TOY_ANSWERS, write_jsonl
from fake_org import KEY, FakeOrg
from test_server import Server

from gpt_finetune.batch import completed_lines
from gpt_finetune.services import Services

TODAY = "2026-12-01"


def case(i: int) -> dict:
    """A learnable mapping with prompts that are all different (so each request names its prompt)."""
    return {
        "messages": [
            {"role": "system", "content": "Answer with a colour."},
            {"role": "user", "content": f"thing {i % 4} case {i}"},
            {"role": "assistant", "content": TOY_ANSWERS[i % 4]},
        ]
    }


def old_model(model: str, messages: list[dict]) -> str:
    return TOY_ANSWERS[int(messages[-1]["content"].split()[1])]


def cli(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt_finetune", "migrate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gpt_finetune", "migrate", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_whole_move_survives_kills_and_the_old_id_answers_through_the_server(
    tmp_path, tiny_model_dir, isolated_home
):
    mine = tmp_path / "mine"
    mine.mkdir()
    train = write_jsonl(mine / "colours.jsonl", [case(i) for i in range(24)])
    valid = write_jsonl(mine / "colours-valid.jsonl", [case(i) for i in range(100, 112)])
    org = FakeOrg()
    org.answer = old_model
    job = org.add_job(
        base="gpt-4o-mini-2024-07-18",
        training_file=org.add_file(train.read_bytes(), train.name, refuse=True),
        validation_file=org.add_file(valid.read_bytes(), valid.name, refuse=True),
        suffix="colours",
        n_epochs=4,
        batch_size=4,
        lr=5.0,
        seed=3,
    )
    old_id = job["fine_tuned_model"]
    d = tmp_path / "move"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        GPT_FINETUNE_HOME=str(isolated_home),
        OPENAI_API_KEY=KEY,
        GPT_FINETUNE_LOG_EVERY_STEPS="1",
        GPT_FINETUNE_TODAY=TODAY,
    )
    with org.serve() as url:
        env["OPENAI_BASE_URL"] = url
        done = cli(env, "inventory", "-o", str(d), "--data", str(mine))
        assert done.returncode == 0, done.stderr
        assert "colours.jsonl (matched)" in done.stdout

        # record, killed -9 after three answers; the rerun asks only what has no answer
        org.chat_delay = 0.3
        proc = start(env, "record", str(d), "--concurrency", "1")
        recordings = d / "recordings" / f"{job['id']}.jsonl"
        wait_for(lambda: recordings.is_file() and len(completed_lines(recordings)) >= 3, 60, "three recordings")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        before = completed_lines(recordings)
        prompts = [json.loads(x) for x in (d / "prompts" / f"{job['id']}.jsonl").read_text().splitlines()]
        answered_before = {json.dumps(p["messages"]) for p in prompts if p["custom_id"] in before}
        org.chat_delay = 0
        asked = len(org.chats())
        done = cli(env, "record", str(d))
        assert done.returncode == 0, done.stderr
        again = org.chats()[asked:]
        assert not answered_before & {json.dumps(m) for m in again}  # no answered prompt asked again
        assert len(again) == len(prompts) - len(before)
        answers = completed_lines(recordings)
        assert len(answers) == len(prompts) == 12

    # retrain (no OpenAI needed from here on), killed -9 while its job trains; the rerun follows
    # the same job: nothing is trained twice
    proc = start(env, "retrain", str(d), "--wait", "--model", str(tiny_model_dir))
    services = Services.open(isolated_home)
    found = wait_for(
        lambda: services.jobs.list_jobs(metadata={"migrated_from": job["id"]})[0], 120, "the local job to be created"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = cli(env, "retrain", str(d), "--wait", "--model", str(tiny_model_dir), timeout=400)
    assert done.returncode == 0, done.stderr
    jobs = services.jobs.list_jobs(metadata={"migrated_from": job["id"]})[0]
    assert [j["id"] for j in jobs] == [found[0]["id"]]
    local = jobs[0]
    assert local["status"] == "succeeded"
    assert local["hyperparameters"]["n_epochs"] == 4 and local["hyperparameters"]["batch_size"] == 4
    assert local["hyperparameters"]["learning_rate_multiplier"] == 5.0 and local["seed"] == 3
    assert local["fine_tuned_model"] == f"ft:tiny-llama:colours:{local['id']}"
    assert local["metadata"]["openai_model"] == old_id and local["metadata"]["training_data"] == "original"
    assert f"now answers as {local['fine_tuned_model']}" in done.stderr

    # the old id answers through the server, and is listed with the local model as its parent
    server = Server(isolated_home, tiny_model_dir)
    try:
        client = server.client()
        answer = client.chat.completions.create(model=old_id, messages=case(1)["messages"][:2], temperature=0)
        assert answer.choices[0].message.content is not None and answer.model == old_id
        listed = {m.id: m for m in client.models.list().data}
        assert listed[old_id].model_extra["parent"] == local["fine_tuned_model"]
    finally:
        server.stop()

    # and through infer, batch files and eval on this machine
    def gpt_finetune(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gpt_finetune", *args], env=env, capture_output=True, text=True, timeout=300
        )

    asked = gpt_finetune("infer", "-m", old_id, "--backend", "local", "-q", "thing 1 case 1", "-t", "0")
    assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
    requests = write_jsonl(tmp_path / "requests.jsonl", [case(i) for i in range(3)])
    batch = gpt_finetune(
        "infer", "-m", old_id, "--backend", "local", "--input", str(requests), "--output", str(tmp_path / "out.jsonl")
    )
    assert batch.returncode == 0, batch.stderr
    assert [json.loads(x)["response"]["body"]["model"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        old_id
    ] * 3
    scored = gpt_finetune(
        "eval", "-m", old_id, "-d", str(valid), "--backend", "local", "--baseline", "none", "--mode", "free", "--json"
    )
    assert scored.returncode == 0 and old_id in json.loads(scored.stdout)["results"], scored.stderr

    done = cli(env, "compare", str(d), timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((d / "compare" / job["id"] / "compare.json").read_text())
    assert result["n"] == 12 and result["local_model"] == local["fine_tuned_model"]
    assert 0 <= result["exact_agreement"] <= 1 and result["task"] == "classification"
    assert result["vs_references"]["old"]["accuracy"] == 1.0  # the fake answers every reference
    assert result["openai_cost"]["usd"] > 0
    assert (d / "compare" / job["id"] / "report.md").is_file() and (
        d / "compare" / job["id"] / "per_label.png"
    ).is_file()
    status = cli(env, "status", str(d))
    assert status.returncode == 0 and "compared" in status.stdout and "nothing" in status.stdout
