"""Batch inference: Batch API and chat lines in, one record per line out; interrupted runs resume
and every line is answered exactly once; failed lines get an error record and exit code 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, toy_examples, write_jsonl

from gpt_finetune.batch import read_requests, run_batch
from gpt_finetune.errors import BackendError, DataError


def batch_lines(n):
    return [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(n)
    ]


def fake_chat(calls):
    def chat(body):
        calls.append(body["messages"][-1]["content"])
        if body["messages"][-1]["content"] == "q3":
            raise BackendError("refused", code="invalid_value")
        return {"choices": [{"message": {"content": body["messages"][-1]["content"].upper()}}]}

    return chat


def test_every_line_once_in_input_order_with_error_records(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", batch_lines(8))
    calls: list[str] = []
    result = run_batch(fake_chat(calls), src, tmp_path / "out.jsonl", concurrency=3, backoff=0)
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(8)]
    assert rows[0]["response"]["body"]["choices"][0]["message"]["content"] == "Q0"
    assert rows[3]["response"] is None and rows[3]["error"] == {"code": "invalid_value", "message": "refused"}
    assert (result.total, result.succeeded, result.failed) == (8, 7, 1)
    assert sorted(calls) == sorted(f"q{i}" for i in range(8))  # refused lines are not retried
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_an_interrupted_run_resumes_and_answers_each_line_exactly_once(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", batch_lines(10))
    calls: list[str] = []
    inner = fake_chat(calls)

    def interrupted(body):
        if len(calls) >= 4:
            raise KeyboardInterrupt
        return inner(body)

    with pytest.raises(KeyboardInterrupt):
        run_batch(interrupted, src, tmp_path / "out.jsonl", concurrency=1, backoff=0)
    partial = tmp_path / "out.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 4 and not (tmp_path / "out.jsonl").exists()
    with open(partial, "a") as fh:
        fh.write('{"custom_id": "req-9", "resp')  # a line torn by a kill in the middle of a write
    result = run_batch(inner, src, tmp_path / "out.jsonl", concurrency=2, backoff=0)
    assert result.skipped == 4
    assert sorted(calls) == sorted(f"q{i}" for i in range(10))  # each asked once in all
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(10)]


def test_passing_errors_are_retried_with_back_off(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", batch_lines(2))
    tries = {"n": 0}

    def flaky(body):
        tries["n"] += 1
        if tries["n"] <= 2:
            raise BackendError("slow down", code="rate_limit_exceeded")
        return {"ok": True}

    result = run_batch(flaky, src, tmp_path / "out.jsonl", concurrency=1, backoff=0.01)
    assert result.failed == 0 and tries["n"] == 4


def test_chat_lines_and_bad_lines(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", toy_examples(3))
    reqs = read_requests(src, "m")
    assert [cid for cid, _ in reqs] == ["line-1", "line-2", "line-3"]
    assert reqs[0][1]["messages"][-1]["role"] == "user"  # the reference answer is not sent
    (tmp_path / "dup.jsonl").write_text(json.dumps(batch_lines(1)[0]) + "\n" + json.dumps(batch_lines(1)[0]) + "\n")
    with pytest.raises(DataError, match=r"dup\.jsonl:2: custom_id: custom_id 'req-0' appears twice"):
        read_requests(tmp_path / "dup.jsonl", None)


def test_the_cli_resumes_after_kill_9_on_a_local_model(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{**r, "body": {**r["body"], "max_tokens": 16}} for r in batch_lines(20)])
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "gpt_finetune", "infer", "--backend", "local", "-m", str(tiny_model_dir)]
    cmd += ["--input", str(src), "--output", str(out), "-t", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "out.jsonl.partial"
    deadline = time.time() + 120
    while not (partial.exists() and len(partial.read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {json.loads(x)["custom_id"]: x for x in partial.read_text().splitlines() if x.endswith("}")}
    assert 3 <= len(before) < 20 and not out.exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Resuming" in r.stderr and "20 answered, 0 failed" in r.stderr
    rows = out.read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in rows] == [f"req-{i}" for i in range(20)]
    assert all(row in rows for row in before.values())  # finished lines kept as they were


def test_batch_lines_carry_the_confidences_of_label_constrained_answers(tmp_path, tiny_model_dir):
    import math

    from gpt_finetune.cli.main import main

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": ["bug", "feature", "question"], "label_format": "seed"}))
    src = write_jsonl(tmp_path / "in.jsonl", batch_lines(3))
    base = ["infer", "--backend", "local", "-m", str(tiny_model_dir), "--input", str(src), "--labels", str(labels)]
    one = tmp_path / "one.jsonl"
    assert main([*base, "--output", str(one), "--confidence"]) == 0
    for row in map(json.loads, one.read_text().splitlines()):
        choice = row["response"]["body"]["choices"][0]
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        assert choice["message"]["content"] == top[0]["token"]  # the most likely candidate is the answer
        assert sum(math.exp(t["logprob"]) for t in top) == pytest.approx(1.0)  # over the 3 candidates
    each = tmp_path / "each.jsonl"
    assert main([*base, "--output", str(each), "--each-label", "--confidence"]) == 0
    for row in map(json.loads, each.read_text().splitlines()):
        content = row["response"]["body"]["choices"][0]["logprobs"]["content"][0]
        assert sorted(t["token"] for t in content["top_logprobs"]) == ["bug", "feature", "question"]
        assert all(0 < math.exp(t["logprob"]) <= 1 + 1e-9 for t in content["top_logprobs"])
