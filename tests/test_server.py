"""``gpt-finetune serve`` end to end: a real server process on a free loopback port, a tiny model,
and the official ``openai`` client with strict response validation. Every response is also checked
against the schemas of OpenAI's published spec (tests/spec)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, toy_examples, toy_pairs, write_jsonl

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("torch")


def _nullable(node):
    """The spec mixes OpenAPI 3.0's ``nullable: true`` and boolean ``exclusiveMinimum`` into 3.1
    schemas: make them JSON Schema (a boolean bound reads as the number 1 otherwise, and refuses
    a learning_rate_multiplier of 1.0)."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.get("exclusiveMinimum") is True and "minimum" in node:
        node["exclusiveMinimum"] = node.pop("minimum")
    elif node.get("exclusiveMinimum") is False:
        node.pop("exclusiveMinimum")
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


SCHEMAS = _nullable(json.loads((Path(__file__).parent / "spec" / "openai_schemas.json").read_text()))
MSGS = [{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": "thing 2"}]


def conforms(name: str, body) -> None:
    import jsonschema

    schema = {"$ref": f"#/components/schemas/{name}", "components": SCHEMAS["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, model_dir: Path, *args: str, env: dict | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"serve-{self.port}.log"
        self.env = dict(
            os.environ,
            PYTHONPATH=str(ROOT / "src"),
            GPT_FINETUNE_LOCAL_BASE_MODEL=str(model_dir),
            GPT_FINETUNE_LOG_EVERY_STEPS="1",
            **(env or {}),
        )
        cmd = [sys.executable, "-m", "gpt_finetune", "serve", "--home", str(home), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            assert self.proc.poll() is None, self.log.read_text()
        raise AssertionError("the server did not start: " + self.log.read_text())

    def client(self, key: str = "none", strict: bool = True):
        return openai.OpenAI(
            api_key=key, base_url=self.url + "/v1", max_retries=0, _strict_response_validation=strict, timeout=60
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        subprocess.run(["pkill", "-f", "--", f"--home {self.home}"], check=False)  # its runner, if any


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("server") / "home"
    s = Server(home, tiny_model_dir, env={"GPT_FINETUNE_TRAINING_TYPE": "full"})
    yield s
    s.stop()


def wait_job(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {statuses}")


def upload(client, tmp_path, rows, name="train.jsonl"):
    return client.files.create(file=open(write_jsonl(tmp_path / name, rows), "rb"), purpose="fine-tune")


def test_files(server, tmp_path):
    client = server.client()
    a = upload(client, tmp_path, toy_examples(12), "a.jsonl")
    b = upload(client, tmp_path, toy_examples(10), "b.jsonl")
    conforms("OpenAIFile", a.model_dump(exclude_unset=True))
    assert a.filename == "a.jsonl" and a.bytes == (tmp_path / "a.jsonl").stat().st_size
    page = client.files.list(limit=1)
    assert [f.id for f in page.data] == [b.id] and page.has_more
    conforms("ListFilesResponse", httpx.get(server.url + "/v1/files?limit=1").json())
    assert [f.id for f in client.files.list(limit=1, after=b.id).data] == [a.id]
    assert client.files.retrieve(a.id).id == a.id
    assert client.files.content(a.id).read() == (tmp_path / "a.jsonl").read_bytes()
    deleted = client.files.delete(a.id)
    assert deleted.deleted and deleted.id == a.id
    conforms("DeleteFileResponse", deleted.model_dump(exclude_unset=True))
    with pytest.raises(openai.NotFoundError) as err:
        client.files.retrieve(a.id)
    assert err.value.code == "file_not_found"
    with pytest.raises(openai.NotFoundError):  # ids never become paths outside the data directory
        client.files.retrieve("../../etc/passwd")
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=open(tmp_path / "b.jsonl", "rb"), purpose="nonsense")
    assert err.value.body["param"] == "purpose"


def test_a_job_trains_is_followed_and_its_model_answers(server, tmp_path):
    client = server.client()
    train = upload(client, tmp_path, toy_examples(20))
    valid = upload(client, tmp_path, toy_examples(8), "valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini",
        training_file=train.id,
        validation_file=valid.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 40}},
        },
        suffix="toy",
        seed=7,
        metadata={"team": "net"},
    )
    assert job.status == "validating_files" and job.metadata["team"] == "net"
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    conforms("FineTuningJob", done.model_dump(exclude_unset=True))
    assert done.fine_tuned_model == f"ft:tiny-llama:toy:{job.id}"
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "net"}).data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "other"}).data == []

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    conforms("ListFineTuningJobEventsResponse", httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}/events").json())
    assert "successfully completed" in events[0].message
    assert any(e.type == "metrics" and "train_loss" in e.data for e in events)
    older = client.fine_tuning.jobs.list_events(job.id, limit=2, after=events[1].id).data
    assert [e.id for e in older] == [e.id for e in events[2:4]]

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [10, 5]
    conforms(
        "ListFineTuningJobCheckpointsResponse",
        httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}/checkpoints").json(),
    )
    models = {m.id: m for m in client.models.list()}
    conforms("ListModelsResponse", httpx.get(server.url + "/v1/models").json())
    ft = models[done.fine_tuned_model].model_dump()
    assert ft["root"] == ft["parent"] == "tiny-llama" and ft["owned_by"] == "user"
    assert models[ckpts[0].fine_tuned_model_checkpoint].model_dump()["parent"] == done.fine_tuned_model
    assert client.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model

    # the fine-tuned model answers at once, without a restart, as it was trained
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=MSGS, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2
    )
    conforms("CreateChatCompletionResponse", answer.model_dump(exclude_unset=True))
    tuned = answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens == len(answer.choices[0].logprobs.content) >= 1
    assert len(answer.choices[0].logprobs.content[0].top_logprobs) == 2
    base = client.chat.completions.create(model="tiny-llama", messages=MSGS, temperature=0, max_tokens=8)
    assert base.choices[0].message.content != tuned  # the base model is served with the adapter off

    stream = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=MSGS,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for c in chunks:
        conforms("CreateChatCompletionStreamResponse", c.model_dump(exclude_unset=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tuned
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens

    # a job that ended cannot be cancelled; a deleted model stops being served at once
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.models.delete(done.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=done.fine_tuned_model, messages=MSGS, max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # base models cannot be deleted
        client.models.delete("tiny-llama")


def test_a_dpo_job_through_the_sdk_is_created_followed_and_its_model_answers(server, tmp_path):
    client = server.client()
    train = upload(client, tmp_path, toy_pairs(12), "pairs.jsonl")
    valid = upload(client, tmp_path, toy_pairs(4, shift=1), "valid-pairs.jsonl")
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini",
        training_file=train.id,
        validation_file=valid.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 2, "batch_size": 4}}},
        suffix="prefs",
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.5
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    conforms("FineTuningJob", done.model_dump(exclude_unset=True))
    assert [j.method.type for j in client.fine_tuning.jobs.list().data if j.id == job.id] == ["dpo"]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert steps and all("rewards/margins" in d and "rewards/accuracies" in d for d in steps)
    assert any("valid_rewards/accuracies" in (e.data or {}) for e in events if e.type == "metrics")
    result = client.files.content(done.result_files[0]).text.splitlines()
    assert result[0].startswith("step,train_loss,rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies")
    assert len(result) == 1 + 6  # one row per step
    answer = client.chat.completions.create(model=done.fine_tuned_model, messages=MSGS, temperature=0, max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")
    # a chat file is not a preference file: the job fails with the line that says so
    chat = upload(client, tmp_path, toy_examples(12))
    wrong = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=chat.id, method={"type": "dpo"})
    failed = wait_job(client, wrong.id)
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert "a dpo job needs preference pairs" in failed.error.message and "line 1" in failed.error.message


def test_pause_and_resume(server, tmp_path):
    """The spec's pause answers status "paused", which the SDK's typed status does not list: a
    non-strict client reads it."""
    client = server.client(strict=False)
    train = upload(client, tmp_path, toy_examples(24))
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=train.id, hyperparameters={"n_epochs": 20, "batch_size": 2}
    )
    deadline = time.time() + 180
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data):
        assert time.time() < deadline, "no training step"
        time.sleep(0.3)
    # training runs in the worker process: the server answers meanwhile (latency: bench/README.md)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    for path in ("/health", "/v1/models", f"/v1/fine_tuning/jobs/{job.id}/events"):
        assert httpx.get(server.url + path, timeout=5).status_code == 200
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    deadline = time.time() + 120
    while not (
        stopped := [e for e in client.fine_tuning.jobs.list_events(job.id).data if "paused at step" in e.message]
    ):
        assert time.time() < deadline, "the worker did not stop"
        time.sleep(0.3)
    step = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number  # saved where it stopped
    assert f"paused at step {step}" in stopped[0].message and 0 < step < 240
    saved = [
        e
        for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data
        if e.message == f"Checkpoint created at step {step}"
    ]
    assert len(saved) == 1  # saved once (the Trainer ends the epoch a pause stops in: no second save)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_job(client, job.id, timeout=400)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    assert f"Resuming from checkpoint checkpoint-{step}" in messages


def test_refusals_have_openais_shape(server, tmp_path):
    client = server.client()
    train = upload(client, tmp_path, toy_examples(12))
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            model="gpt-4o-mini", training_file=train.id, method={"type": "reinforcement", "reinforcement": {}}
        )
    assert err.value.code == "unsupported_method" and err.value.body["param"] == "method.type"
    with pytest.raises(openai.BadRequestError) as err:  # beta is above OpenAI's bound of 2
        client.fine_tuning.jobs.create(
            model="gpt-4o-mini",
            training_file=train.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}},
        )
    assert err.value.code == "invalid_hyperparameters" and err.value.body["param"] == "hyperparameters.beta"
    for body, param in [
        ({"model": "gpt-4o-mini", "training_file": train.id, "frobnicate": 1}, "frobnicate"),
        ({"model": "gpt-4o-mini"}, "training_file"),
        (
            {"model": "gpt-4o-mini", "training_file": train.id, "hyperparameters": {"n_epochs": 0}},
            "hyperparameters.n_epochs",
        ),
        ({"model": "gpt-4o-mini", "training_file": train.id, "seed": "x"}, "seed"),
    ]:
        r = httpx.post(server.url + "/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        conforms("ErrorResponse", r.json())
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=MSGS, presence_penalty=1.0)
    assert err.value.body["param"] == "presence_penalty"
    neutral = client.chat.completions.create(
        model="tiny-llama", messages=MSGS, n=1, presence_penalty=0, frequency_penalty=0, max_tokens=2
    )
    assert neutral.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MSGS)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    for raw, status in [(b"{not json", 400), (b"[1, 2]", 400), (b"x" * (17 << 20), 413)]:
        r = httpx.post(
            server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=60
        )
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v1/fine_tuning/jobs?limit=abc")
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    assert server.proc.poll() is None


def test_a_full_queue_answers_429_and_a_dropped_stream_frees_its_place(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "tiny-long"  # the tiny model with a long context, so that one answer takes a while
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    # batching off: the second request waits for the first instead of joining its batch
    s = Server(tmp_path / "home", model, "--max-queue", "1", "--max-batch", "1")
    try:
        long = {"model": "tiny-long", "messages": MSGS, "max_tokens": 8000, "temperature": 0, "stream": True}
        first = httpx.stream("POST", s.url + "/v1/chat/completions", json=long, timeout=120)
        response = first.__enter__()
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # generating now
        second: dict = {}

        def wait_in_queue():
            r = httpx.post(s.url + "/v1/chat/completions", json={**long, "stream": False, "max_tokens": 4}, timeout=120)
            second["status"] = r.status_code

        t = threading.Thread(target=wait_in_queue)
        t.start()
        deadline = time.time() + 30
        while httpx.get(s.url + "/health").json()["queued_requests"] < 1:
            assert time.time() < deadline
            time.sleep(0.05)
        assert httpx.get(s.url + "/health").json()["running_requests"] == 1
        third = httpx.post(s.url + "/v1/chat/completions", json={**long, "stream": False}, timeout=30)
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        assert third.json()["error"]["code"] == "rate_limit_exceeded"
        first.__exit__(None, None, None)  # the client goes away mid-stream
        t.join(60)
        assert second["status"] == 200  # the engine went on to the waiting request
        r = httpx.post(s.url + "/v1/chat/completions", json={**long, "stream": False, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
    finally:
        s.stop()


def test_api_keys(tmp_path, tiny_model_dir):
    key = "sk-local-0123456789abcdef"
    s = Server(tmp_path / "home", tiny_model_dir, "--api-key", key, "--api-key", "sk-second-key-xyz")
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            s.client("sk-wrong-key-000000").models.list()
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "tiny-llama" in [m.id for m in s.client(key).models.list()]
        assert s.client("sk-second-key-xyz").models.list()
        # the metrics name workers' hosts and the queue: a scraper sends the key as a bearer
        assert httpx.get(s.url + "/metrics").status_code == 401
        scraped = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
        assert scraped.status_code == 200 and 'gpt_finetune_jobs{status="queued"} 0.0' in scraped.text
    finally:
        s.stop()
    log = s.log.read_text()
    assert key not in log and "sk-wrong-key-000000" not in log
    # any address other than loopback needs a key
    r = subprocess.run(
        [sys.executable, "-m", "gpt_finetune", "serve", "--home", str(tmp_path / "h2"), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        timeout=60,
    )
    assert r.returncode == 1 and "without an API key" in r.stderr and "Hint:" in r.stderr


def test_the_seed_scripts_and_the_openai_backend_run_unchanged_against_the_server(server, tmp_path):
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        OPENAI_BASE_URL=server.url + "/v1",
        OPENAI_API_KEY="sk-anything-1234",
        GPT_FINETUNE_HOME=str(tmp_path / "client-home"),
    )
    data = write_jsonl(tmp_path / "output.jsonl", toy_examples(16))
    cfg = tmp_path / "train.cfg"
    cfg.write_text(
        f"training_file = {data}\nmodel = gpt-4o-mini\nn_epochs = 2\nbatch_size = 4\n"
        "learning_rate_multiplier = 40\nsuffix = seed\n"
    )

    def run(*args, script=None):
        cmd = [sys.executable, str(ROOT / script)] if script else [sys.executable, "-m", "gpt_finetune"]
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=400)
        assert r.returncode == 0, r.stderr
        return r

    out = run("-c", str(cfg), script="finetune.py")
    job_id = next(w for w in out.stdout.split() if w.startswith("ftjob-"))
    waited = run("jobs", "wait", job_id)
    assert "succeeded" in waited.stdout + waited.stderr
    listing = run("jobs", "list").stdout
    assert job_id in listing
    assert "Step" in run("jobs", "events", job_id).stdout
    cancel = subprocess.run(
        [sys.executable, "-m", "gpt_finetune", "jobs", "cancel", job_id], capture_output=True, text=True, env=env
    )
    assert cancel.returncode == 1 and "cannot be cancelled" in cancel.stderr  # the server's 409, as one Error line
    assert job_id in run("jobs", "get", job_id).stdout
    assert f"ft:tiny-llama:seed:{job_id}" in run("models", "list").stdout
    assert "output.jsonl" in run("files", "list").stdout
    icfg = tmp_path / "infer.cfg"
    icfg.write_text(
        f"ft_job_id = {job_id}\nsys_prompt = Answer with a colour.\nuser_input = thing 1\ntemperature = 0\n"
    )
    said = run("-c", str(icfg), script="infer.py").stdout.strip()
    direct = server.client().chat.completions.create(
        model=f"ft:tiny-llama:seed:{job_id}",
        messages=[{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": "thing 1"}],
        temperature=0,
    )
    assert said == direct.choices[0].message.content.strip() != ""
    assert run("infer", "-c", str(icfg), "--stream").stdout.strip() == said


def test_guided_choice_through_the_sdk(server):
    """The label-constrained extension, as a plain openai client sends it (extra_body): vLLM's
    current structured_outputs.choice and its old guided_choice give the same answer."""
    choices = ["'bug'", "'feature'", "'question'"]
    answer = server.client().chat.completions.create(
        model="tiny-llama", messages=MSGS, extra_body={"guided_choice": choices}
    )
    assert answer.choices[0].message.content in choices and answer.choices[0].finish_reason == "stop"
    current = server.client().chat.completions.create(
        model="tiny-llama", messages=MSGS, extra_body={"structured_outputs": {"choice": choices}}
    )
    assert current.choices[0].message.content == answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(model="tiny-llama", messages=MSGS, extra_body={"guided_choice": []})
    assert err.value.body["param"] == "guided_choice"
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(
            model="tiny-llama", messages=MSGS, extra_body={"structured_outputs": {"regex": "[a-z]+"}}
        )
    assert err.value.body["param"] == "structured_outputs.regex"
    assert err.value.body["code"] == "unsupported_parameter"


def test_concurrent_streams_each_get_the_answer_they_get_alone(server):
    """Eight clients stream at once through the real server (one running batch in the engine):
    each stream carries its own request's tokens and log-probabilities, none of another's (the
    log-probabilities tell the prompts apart where a tiny model's tokens do not)."""
    prompts = [[MSGS[0], {"role": "user", "content": f"thing {k} " + "more " * k}] for k in range(8)]

    def answer(c) -> tuple[str, tuple[float, ...]]:
        return c.message.content, tuple(round(t.logprob, 3) for t in c.logprobs.content)

    client = server.client()
    alone = [
        answer(
            client.chat.completions.create(
                model="tiny-llama", messages=p, temperature=0, max_tokens=24, logprobs=True
            ).choices[0]
        )
        for p in prompts
    ]
    got: dict[int, tuple[str, tuple[float, ...]]] = {}
    start = threading.Barrier(len(prompts))

    def stream(k: int) -> None:
        start.wait()
        chunks = [
            c.choices[0]
            for c in server.client().chat.completions.create(
                model="tiny-llama", messages=prompts[k], temperature=0, max_tokens=24, stream=True, logprobs=True
            )
            if c.choices
        ]
        text = "".join(c.delta.content or "" for c in chunks)
        got[k] = (text, tuple(round(t.logprob, 3) for c in chunks if c.logprobs for t in c.logprobs.content or []))

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(set(alone)) == len(prompts)  # every prompt's answer is told apart
    assert got == dict(enumerate(alone))
    assert httpx.get(server.url + "/health").json()["running_requests"] == 0


def test_eval_through_the_openai_backend_equals_eval_on_the_local_engine(server, tmp_path):
    """`eval` on a remote model (this project's server, through the openai backend) scores free
    and label-constrained answers exactly as the same model scores in-process."""
    words = ["crash when the pod restarts", "please add a flag", "how do I configure it"]
    labels = ["'bug'", "'feature'", "'question'"]
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Label the issue."},
                {"role": "user", "content": f"title: {words[i % 3]} {i}"},
                {"role": "assistant", "content": labels[i % 3]},
            ]
        }
        for i in range(12)
    ]
    train, valid = write_jsonl(tmp_path / "t.jsonl", rows[:9]), write_jsonl(tmp_path / "v.jsonl", rows[9:])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), GPT_FINETUNE_HOME=str(tmp_path / "h"))
    env["GPT_FINETUNE_LOCAL_BASE_MODEL"] = server.env["GPT_FINETUNE_LOCAL_BASE_MODEL"]
    common = ["eval", "-m", "tiny-llama", "-d", str(valid), "--train", str(train), "--task", "classification"]
    common += ["--max-tokens", "4", "--json"]

    def run(*args):
        r = subprocess.run(
            [sys.executable, "-m", "gpt_finetune", *common, *args], capture_output=True, text=True, env=env, timeout=300
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["results"]

    remote = run("--backend", "openai", "--base-url", server.url + "/v1", "-k", "sk-test-1234", "--mode", "both")
    local = run("--backend", "local", "--mode", "both")
    assert set(remote) == {"tiny-llama (free)", "tiny-llama (constrained)", "tfidf+logreg"}
    assert remote["tiny-llama (constrained)"]["out_of_set_rate"] == 0
    assert remote == local
