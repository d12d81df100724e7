"""The command line on the local backend, without training: models, files, jobs, infer, chat."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("transformers")

from conftest import chat_example, write_jsonl

from gpt_finetune.cli.main import main


def test_local_is_the_default_without_keys_and_is_announced(tmp_path, capsys, tiny_model_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [chat_example(i) for i in range(3)])
    assert main(["finetune", "-d", str(path), "-m", str(tiny_model_dir), "--no-validate"]) == 0
    out, err = capsys.readouterr()
    assert "Using the local backend" in err
    job_id = out.strip()
    deadline = time.time() + 60
    while True:  # the runner checks the files after the job is created, as OpenAI does
        assert main(["jobs", "get", job_id, "--json"]) == 0
        job = json.loads(capsys.readouterr().out)
        if job["status"] != "validating_files" or time.time() > deadline:
            break
        time.sleep(0.3)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_n_examples"  # 3 < 10
    assert main(["jobs", "list"]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "events", job_id]) == 0
    assert "must have at least 10 examples" in capsys.readouterr().out


def test_files_commands(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [chat_example(i) for i in range(3)])
    assert main(["files", "upload", str(path), "--json"]) == 0
    fid = json.loads(capsys.readouterr().out)["id"]
    assert main(["files", "list"]) == 0 and fid in capsys.readouterr().out
    assert main(["files", "get", fid]) == 0 and "t.jsonl" in capsys.readouterr().out
    assert main(["files", "delete", fid]) == 0
    assert main(["files", "get", fid]) == 1
    assert "No such File object" in capsys.readouterr().err


def test_models_list_shows_the_default(capsys):
    assert main(["models", "list", "--backend", "local"]) == 0
    assert "SmolLM2-135M-Instruct" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["infer", "--backend", "local", "-m", "no-such-model", "-q", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Error: The model 'no-such-model' does not exist" in err and "models list" in err


def test_infer_stream_and_chat_with_a_local_directory_model(tiny_model_dir, capsys, monkeypatch):
    assert (
        main(
            [
                "infer",
                "--backend",
                "local",
                "-m",
                str(tiny_model_dir),
                "-q",
                "hi",
                "--max-tokens",
                "4",
                "-t",
                "0",
                "--stream",
            ]
        )
        == 0
    )
    streamed = capsys.readouterr().out
    assert (
        main(["infer", "--backend", "local", "-m", str(tiny_model_dir), "-q", "hi", "--max-tokens", "4", "-t", "0"])
        == 0
    )
    assert capsys.readouterr().out == streamed and len(streamed) > 1  # some text, then the newline
    lines = iter(["hi", "/reset", "hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(tiny_model_dir), "--backend", "local", "--max-tokens", "4", "-t", "0"]) == 0
    assert capsys.readouterr().out == streamed + streamed  # /reset forgot the first turn


def test_stats_counts_tokens_with_the_local_tokenizer(tmp_path, capsys, smol_tokenizer_dir):
    rows = [chat_example(i) for i in range(12)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert main(["stats", str(path), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)["local"]
    assert local["model"] == "SmolLM2-135M-Instruct"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    expected = sum(
        len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
        for r in rows
    )
    assert local["total_tokens"] == expected
    assert 0 < local["assistant_tokens"] < local["total_tokens"]


def test_finetune_takes_method_dpo_and_beta_from_flags_or_the_config(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from conftest import toy_pairs

    from gpt_finetune.services.jobs import JobService

    monkeypatch.setattr(JobService, "kick", lambda self: False)  # created, not trained
    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(12))
    cfg = tmp_path / "train.cfg"
    cfg.write_text(f"training_file = {pairs}\nmodel = {tiny_model_dir}\nmethod = dpo\nbeta = 0.3\nn_epochs = 2\n")
    assert main(["finetune", "--config", str(cfg)]) == 0
    job_id = capsys.readouterr().out.strip()
    assert main(["jobs", "get", job_id, "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
        "beta": 0.3,
    }
    # beta belongs to dpo; a chat file is not a preference file: both refused before any upload
    chat = write_jsonl(tmp_path / "chat.jsonl", [chat_example(i) for i in range(12)])
    assert main(["finetune", "-d", str(chat), "-m", str(tiny_model_dir), "--beta", "0.2"]) != 0
    assert "beta is a hyperparameter of method dpo, not supervised" in capsys.readouterr().err
    assert main(["finetune", "-d", str(chat), "-m", str(tiny_model_dir), "--method", "dpo"]) != 0
    err = capsys.readouterr().err
    assert "chat.jsonl:1" in err and "holds chat examples, but the job's method is dpo" in err
    assert main(["finetune", "-d", str(pairs), "-m", str(tiny_model_dir), "--method", "dpo", "--beta", "3"]) != 0
    assert "beta" in capsys.readouterr().err
