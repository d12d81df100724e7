"""The seed's finetune.py and infer.py against the OpenAI API, through the official SDK on a mock
transport: the exact requests they send, and what they print."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT
from fake_openai import FakeOpenAI

from gpt_finetune.backends import openai_backend
from gpt_finetune.cli.main import run_seed
from gpt_finetune.data.convert import ConvertOptions
from gpt_finetune.data.prepare import prepare
from gpt_finetune.errors import BackendError

KEY = "sk-test-1234567890"


@pytest.fixture
def fake(monkeypatch):
    f = FakeOpenAI()
    monkeypatch.setattr(openai_backend, "http_client_factory", f.client)
    return f


@pytest.fixture
def data(tmp_path):
    out = tmp_path / "output.jsonl"
    prepare(
        EXAMPLES / "issues.json", out, options=ConvertOptions(task_type="classification", sys_prompt="S"), split=0.1
    )
    return out


@pytest.mark.parametrize("flags", [["-k", KEY, "-d"], ["--key", KEY, "--data"]])
def test_finetune_short_and_long_flags(fake, data, capsys, flags):
    assert run_seed("finetune", [*flags, str(data)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "ftjob-1"  # the job id, as the seed prints it
    assert "visible to other users" in err and KEY not in err and KEY not in out
    uploads = fake.bodies("POST", "/v1/files")
    assert len(uploads) == 1 and b'name="purpose"\r\n\r\nfine-tune' in uploads[0]
    assert data.read_bytes() in uploads[0]
    assert fake.bodies("POST", "/v1/fine_tuning/jobs") == [{"model": "gpt-3.5-turbo", "training_file": "file-1"}]


def test_finetune_with_train_cfg_sends_every_key(fake, data, tmp_path, capsys):
    cfg = tmp_path / "train.cfg"
    cfg.write_text(
        f"openai_api_key = {KEY}\n"
        f"training_file = {data}\n"
        "model = gpt-3.5-turbo\n"
        "n_epochs = 3\n"
        "batch_size = 1\n"
        "learning_rate_multiplier = 2\n"
        f"validation_file = {data.with_name('output.valid.jsonl')}\n"
    )
    assert run_seed("finetune", ["-c", str(cfg)]) == 0
    assert capsys.readouterr().out.strip() == "ftjob-1"
    assert len(fake.bodies("POST", "/v1/files")) == 2
    assert fake.bodies("POST", "/v1/fine_tuning/jobs") == [
        {
            "model": "gpt-3.5-turbo",
            "training_file": "file-1",
            "validation_file": "file-2",
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 2.0}},
            },
        }
    ]


def test_finetune_key_from_environment_and_placeholder_in_cfg(fake, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cfg = tmp_path / "train.cfg"
    cfg.write_text(f"openai_api_key = <openai_api_key>\ntraining_file = {data}\n")
    assert run_seed("finetune", ["-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "ftjob-1" and "placeholder" in err and "visible to other users" not in err


def test_bad_cfg_value_names_the_key(fake, data, tmp_path, capsys):
    cfg = tmp_path / "train.cfg"
    cfg.write_text(f"openai_api_key = {KEY}\ntraining_file = {data}\nn_epochs = three\n")
    assert run_seed("finetune", ["-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}:3" in err and "n_epochs" in err
    assert fake.requests == []


def test_invalid_data_is_refused_before_upload(fake, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n' * 12)
    assert run_seed("finetune", ["-k", KEY, "-d", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "example_missing_assistant_message" in err
    assert fake.requests == []


def test_wrong_key_is_reported_redacted(fake, data, capsys):
    wrong = "sk-wrong-abcdefghijkl"
    assert run_seed("finetune", ["-k", wrong, "-d", str(data)]) == 1
    err = capsys.readouterr().err
    assert "refused the API key sk-...ijkl" in err and wrong not in err


def test_infer_by_model(fake, capsys):
    assert run_seed("infer", ["--key", KEY, "--model", "ft:gpt-3.5-turbo:org::abc", "-q", "title: x"]) == 0
    assert capsys.readouterr().out == "'proxy'\n"
    body = fake.bodies("POST", "/v1/chat/completions")[0]
    assert body == {"model": "ft:gpt-3.5-turbo:org::abc", "messages": [{"role": "user", "content": "title: x"}]}


def test_infer_by_job_reads_the_model_from_the_job(fake, capsys):
    fake.jobs["ftjob-9"] = {
        "id": "ftjob-9",
        "object": "fine_tuning.job",
        "created_at": 1,
        "error": None,
        "fine_tuned_model": "ft:gpt-3.5-turbo:org::xyz",
        "finished_at": 2,
        "hyperparameters": {},
        "model": "gpt-3.5-turbo",
        "organization_id": "o",
        "result_files": [],
        "seed": 1,
        "status": "succeeded",
        "trained_tokens": 5,
        "training_file": "file-1",
        "validation_file": None,
    }
    assert run_seed("infer", ["--key", KEY, "--job", "ftjob-9", "-q", "q"]) == 0
    assert fake.bodies("POST", "/v1/chat/completions")[0]["model"] == "ft:gpt-3.5-turbo:org::xyz"


@pytest.mark.parametrize("status", ["running", "failed"])
def test_infer_by_unfinished_job_names_its_status(fake, capsys, status):
    fake.jobs["ftjob-9"] = {
        "id": "ftjob-9",
        "object": "fine_tuning.job",
        "created_at": 1,
        "error": {"code": "x", "message": "boom", "param": None} if status == "failed" else None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": {},
        "model": "gpt-3.5-turbo",
        "organization_id": "o",
        "result_files": [],
        "seed": 1,
        "status": status,
        "trained_tokens": None,
        "training_file": "file-1",
        "validation_file": None,
    }
    assert run_seed("infer", ["--key", KEY, "--job", "ftjob-9", "-q", "q"]) == 1
    assert f"job ftjob-9 is {status}" in capsys.readouterr().err
    assert fake.bodies("POST", "/v1/chat/completions") == []


def test_infer_cfg(fake, tmp_path, capsys):
    cfg = tmp_path / "infer.cfg"
    cfg.write_text(
        f"openai_api_key = {KEY}\nft_job_id = <job_id>\nmodel = ft:gpt-3.5-turbo:o::m\nmax_tokens = 20\n"
        "temperature = 0\nsys_prompt = Label it # with labels\nuser_input = title: a = b\n"
    )
    assert run_seed("infer", ["--config", str(cfg)]) == 0
    assert capsys.readouterr().out == "'proxy'\n"
    assert fake.bodies("POST", "/v1/chat/completions")[0] == {
        "model": "ft:gpt-3.5-turbo:o::m",
        "max_tokens": 20,
        "temperature": 0.0,
        "messages": [
            {"role": "system", "content": "Label it # with labels"},
            {"role": "user", "content": "title: a = b"},
        ],
    }


def test_base_url_from_flag(fake, capsys):
    assert run_seed("infer", ["-k", KEY, "--base-url", "http://127.0.0.1:9/v1", "-m", "m", "-q", "q"]) == 0
    assert str(fake.requests[0].url).startswith("http://127.0.0.1:9/v1/chat/completions")


@pytest.mark.parametrize("script", ["data_process.py", "finetune.py", "infer.py"])
def test_help(script):
    r = subprocess.run([sys.executable, str(ROOT / script), "-h"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {script}")
    flags = {
        "data_process.py": ["--input", "--output", "--config"],
        "finetune.py": ["--key", "--data", "--config"],
        "infer.py": ["--key", "--model", "--job", "--config", "-q"],
    }[script]
    for flag in flags:
        assert flag in r.stdout


@pytest.mark.parametrize(
    ("failure", "error", "hint"),
    [
        ((403, "training_not_available", {}), "scripted 403", "no longer accepts new fine-tuning jobs"),
        ((429, "rate_limit_exceeded", {"retry-after": "7"}), "rate limited (HTTP 429)", "wait 7 s"),
        ((500, None, {}), "the server failed (HTTP 500)", "try again later"),
        ("drop", "dropped the connection", "check the network"),
    ],
)
def test_openai_failures_give_one_clear_error(fake, data, capsys, monkeypatch, failure, error, hint):
    monkeypatch.setattr(openai_backend, "MAX_RETRIES", 0)  # the SDK would retry 429, 500 and drops first
    fake.failures[("POST", "/v1/fine_tuning/jobs")] = failure
    assert run_seed("finetune", ["-k", KEY, "-d", str(data)]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[-2].startswith("Error: create fine-tuning job") and error in lines[-2], err
    assert lines[-1].startswith("Hint: ") and hint in lines[-1]
    assert "Traceback" not in err and out == ""


def test_empty_ids_on_the_openai_backend_are_an_error_not_a_traceback(fake, capsys, monkeypatch):
    from gpt_finetune.cli.main import main

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert main(["jobs", "get", "", "--backend", "openai"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: job : Expected a non-empty value") and err.count("\n") == 1


def test_the_openai_backend_answers_the_protocol_verbs_commands_use(fake):
    """chat_many sends each request as the SDK would (extension fields in the body), returns JSON
    answers and errors in order; a job's local description is not OpenAI's to give."""
    backend = openai_backend.OpenAIBackend(KEY, None)
    assert not backend.traits.batched_chat and backend.traits.concurrency > 1
    answers = backend.chat_many(
        [
            {"model": "ft:a", "messages": [{"role": "user", "content": "q"}], "temperature": 0, "guided_choice": ["x"]},
            {"model": "ft:b", "messages": [{"role": "user", "content": "r"}], "max_tokens": 3},
        ]
    )
    assert [a["model"] for a in answers] == ["ft:a", "ft:b"]
    assert answers[0]["choices"][0]["message"]["content"] == fake.answer
    sent = fake.bodies("POST", "/v1/chat/completions")
    assert sent[0]["guided_choice"] == ["x"] and sent[0]["temperature"] == 0 and sent[1]["max_tokens"] == 3
    fake.failures[("POST", "/v1/chat/completions")] = (500, "server_error", {})
    failed = backend.chat_many([{"model": "ft:a", "messages": [{"role": "user", "content": "q"}]}])
    assert len(failed) == 1 and isinstance(failed[0], BackendError)
    assert backend.job_spec("ftjob-1") is None and backend.job_label_sets("ftjob-1") is None


def test_a_server_that_ignores_the_choice_constraint_is_named_not_scored(fake, tmp_path, capsys):
    """The fake answers 'proxy' whatever it is asked (as vLLM 0.12+ does with guided_choice, and
    any server without the extension): label-constrained eval refuses to score that, infer warns,
    and what was sent is vLLM's current field."""
    import json

    from gpt_finetune.cli.main import main

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["bug", "feature"]))
    assert run_seed("infer", ["--key", KEY, "-m", "ft:x", "-q", "title: x", "--labels", str(labels)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "'proxy'\n" and "ignored the choice constraint" in captured.err
    sent = fake.bodies("POST", "/v1/chat/completions")[-1]
    assert sent["structured_outputs"] == {"choice": ["'bug'", "'feature'"]} and "guided_choice" not in sent
    held = tmp_path / "held.jsonl"
    held.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": a}]}) + "\n"
            for i, a in enumerate(["'bug'", "'feature'"] * 3)
        )
    )
    code = main(
        [
            "eval",
            "--key",
            KEY,
            "-m",
            "ft:x",
            "-d",
            str(held),
            "--labels",
            str(labels),
            "--mode",
            "constrained",
            "--baseline",
            "none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "ignored the choice constraint" in err and "--mode free" in err
