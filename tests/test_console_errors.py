"""Bad input through the real console entry point, in a subprocess: one ``Error:`` line (and an
optional ``Hint:``), exit code 1, no traceback, every input byte-identical afterwards, no new
file in the working directory and existing outputs unchanged. Grow the corpus as bugs are found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import chat_example

CLI = str(Path(sys.executable).parent / "gpt-finetune")
GOOD = "".join(json.dumps(chat_example(i)) + "\n" for i in range(12))
SEED = json.dumps(
    [
        {"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "bug"}]}
        for i in range(12)
    ]
)
DEEP_LINE = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n"


def _odd(raw: str) -> str:
    """Good examples with one whose user content is ``raw`` JSON text (valid to Python's json)."""
    line = json.dumps(chat_example(99)).replace('"title: issue 99"', raw)
    return GOOD + line + "\n"


def _odd_seed(raw: str) -> str:
    return (
        SEED[:-1]
        + ', {"id": "x", "conversations": [{"from": "human", "value": '
        + raw
        + '}, {"from": "gpt", "value": "bug"}]}]'
    )


ODD = {"huge integer": "9" * 5000, "lone surrogate": '"\\ud800 text"', "NaN": "NaN", "Infinity": "-Infinity"}

# name: (files to create, argv, extra environment, text the error must contain)
CASES: dict[str, tuple[dict[str, str], list[str], dict[str, str], str]] = {
    # the operating system's limits
    "output on a full device": (
        {"in.jsonl": GOOD},
        ["prepare", "-i", "in.jsonl", "-o", "/dev/full"],
        {},
        "No space left",
    ),
    "output name too long": (
        {"in.jsonl": GOOD},
        ["prepare", "-i", "in.jsonl", "-o", "x" * 300 + ".jsonl"],
        {},
        "File name too long",
    ),
    "model name too long in a config file": (
        {"in.jsonl": GOOD, "m.cfg": "model = " + "m" * 300 + "\n"},
        ["finetune", "-d", "in.jsonl", "-c", "m.cfg", "--backend", "local"],
        {},
        "File name too long",
    ),
    # values Python's json reads but no later step (or other JSON parser) can use
    **{
        f"{name}: {command}": (
            {"in.jsonl": _odd(raw), "in.json": _odd_seed(raw)},
            argv,
            {},
            {
                "huge integer": "digits",
                "lone surrogate": "lone surrogate",
                "NaN": "NaN is not",
                "Infinity": "Infinity is not",
            }[name],
        )
        for name, raw in ODD.items()
        for command, argv in (
            ("finetune", ["finetune", "-d", "in.jsonl", "--backend", "local"]),  # its local check is validate's
            ("prepare seed", ["prepare", "-i", "in.json", "-o", "o.jsonl"]),
            ("prepare chat", ["prepare", "-i", "in.jsonl", "-o", "o.jsonl"]),
        )
    },
    "validation output is the input": (
        {"in.jsonl": GOOD},
        ["prepare", "-i", "in.jsonl", "-o", "out.jsonl", "--split", "0.5", "--validation-output", "in.jsonl"],
        {},
        "would overwrite the input",
    ),
    "default validation output is the input": (
        {"a.valid.jsonl": GOOD},
        ["prepare", "-i", "a.valid.jsonl", "-o", "a.jsonl", "--split", "0.5"],
        {},
        "would overwrite the input",
    ),
    "output and validation output are one file": (
        {"in.jsonl": GOOD, "out.jsonl": "old\n"},
        ["prepare", "-i", "in.jsonl", "-o", "out.jsonl", "--split", "0.5", "--validation-output", "out.jsonl"],
        {},
        "two outputs of this run are the same file",
    ),
    "output is a symlink to the input": (
        {"in.jsonl": GOOD, "link.jsonl": "->in.jsonl"},
        ["prepare", "-i", "in.jsonl", "-o", "link.jsonl"],
        {},
        "would overwrite the input",
    ),
    "one output of the group is a directory": (
        {"in.jsonl": GOOD, "out.jsonl": "old\n", "out.valid.jsonl/": ""},
        ["prepare", "-i", "in.jsonl", "-o", "out.jsonl", "--split", "0.5"],
        {},
        "is a directory",
    ),
    "output is a directory": ({"in.jsonl": GOOD, "d/": ""}, ["prepare", "-i", "in.jsonl", "-o", "d"], {}, "directory"),
    "output directory is missing": (
        {"in.jsonl": GOOD},
        ["prepare", "-i", "in.jsonl", "-o", "nowhere/out.jsonl"],
        {},
        "does not exist",
    ),
    "deeply nested record: prepare": (
        {"deep.jsonl": DEEP_LINE},
        ["prepare", "-i", "deep.jsonl", "-o", "o.jsonl"],
        {},
        "nested too deeply",
    ),
    "deeply nested record: stats": (
        {"deep.jsonl": DEEP_LINE},
        ["stats", "deep.jsonl", "--no-local"],
        {},
        "no valid examples",
    ),
    "deeply nested record: finetune": (
        {"deep.jsonl": DEEP_LINE},
        ["finetune", "-d", "deep.jsonl", "--backend", "local"],
        {},
        "nested too deeply",
    ),
    "deeply nested seed JSON": (
        {"deep.json": "[" + DEEP_LINE.strip() + "]"},
        ["prepare", "-i", "deep.json", "-o", "o.jsonl"],
        {},
        "nested too deeply",
    ),
    "CSV row with fewer fields": (
        {"in.csv": "title,body,label\na,b,bug\nc,d\n"},
        ["prepare", "-i", "in.csv", "-o", "o.jsonl", "--prompt-columns", "title,body", "--label-column", "label"],
        {},
        "in.csv:3: label: has 2 fields, the header has 3",
    ),
    "CSV row missing a prompt column": (
        {"in.csv": "title,body,label\na,b,bug\nc\n"},
        ["prepare", "-i", "in.csv", "-o", "o.jsonl", "--prompt-columns", "title,body", "--label-column", "label"],
        {},
        "in.csv:3: body:",
    ),
    "empty message": (
        {"in.json": SEED.replace('"q3"', '""')},
        ["prepare", "-i", "in.json", "-o", "o.jsonl"],
        {},
        "the user message is empty",
    ),
    "label the seed format cannot carry": (
        {"in.json": SEED.replace('"bug"', '"it\'s"', 1)},
        ["prepare", "-i", "in.json", "-o", "o.jsonl", "--task-type", "classification"],
        {},
        "--label-format json",
    ),
    "upload a missing file": ({}, ["files", "upload", "missing.jsonl", "--backend", "local"], {}, "no such file"),
    "upload a directory": ({"d/": ""}, ["files", "upload", "d", "--backend", "local"], {}, "is a directory"),
    "data directory is a file": (
        {"home": "not a directory"},
        ["jobs", "list", "--backend", "local"],
        {"GPT_FINETUNE_HOME": "home"},
        "is not a directory",
    ),
    "zero-byte store": (
        {"h/gpt-finetune.db": ""},
        ["jobs", "list", "--backend", "local"],
        {"GPT_FINETUNE_HOME": "h"},
        "is empty (0 bytes), not a database",
    ),
    "corrupt store": (
        {"h/gpt-finetune.db": "this is not sqlite " * 300},
        ["jobs", "list", "--backend", "local"],
        {"GPT_FINETUNE_HOME": "h"},
        "cannot be read: file is not a database",
    ),
    "negative seed": ({"in.jsonl": GOOD}, ["finetune", "-d", "in.jsonl", "--seed", "-1"], {}, "from 0 to 2147483647"),
    "huge seed": ({"in.jsonl": GOOD}, ["finetune", "-d", "in.jsonl", "--seed", str(2**31)], {}, "from 0 to 2147483647"),
    "split seed out of range": (
        {"in.jsonl": GOOD},
        ["prepare", "-i", "in.jsonl", "-o", "o.jsonl", "--split", "0.5", "--seed", "-3"],
        {},
        "--seed '-3'",
    ),
    "flag out of range": (
        {"in.jsonl": GOOD},
        ["finetune", "-d", "in.jsonl", "--n-epochs", "99"],
        {},
        "must be from 1 to 50",
    ),
    "learning rate multiplier inf": (
        {"in.jsonl": GOOD, "t.cfg": "training_file = in.jsonl\nlearning_rate_multiplier = inf\n"},
        ["finetune", "-c", "t.cfg"],
        {},
        "learning_rate_multiplier = 'inf'",
    ),
    "number with an underscore": (
        {"in.jsonl": GOOD, "t.cfg": "training_file = in.jsonl\nn_epochs = 1_0\n"},
        ["finetune", "-c", "t.cfg"],
        {},
        "t.cfg:2",
    ),
    "number with a sign": (
        {"in.jsonl": GOOD, "t.cfg": "training_file = in.jsonl\nbatch_size = +4\n"},
        ["finetune", "-c", "t.cfg"],
        {},
        "batch_size = '+4'",
    ),
    "non-ASCII digits": (
        {"in.jsonl": GOOD, "t.cfg": "training_file = in.jsonl\nn_epochs = \u0663\n"},
        ["finetune", "-c", "t.cfg"],
        {},
        "t.cfg:2: n_epochs = '\u0663': expected a whole number",
    ),
    "jobs list --limit 0": ({}, ["jobs", "list", "--limit", "0", "--backend", "local"], {}, "must be at least 1"),
    "jobs list negative limit": ({}, ["jobs", "list", "--limit", "-5", "--backend", "local"], {}, "--limit '-5'"),
    "unknown local base model": (
        {"in.jsonl": GOOD},
        ["finetune", "-d", "in.jsonl", "--backend", "local", "--model", "no-such-model"],
        {},
        "unknown base model",
    ),
    "delete a base model": (
        {},
        ["models", "delete", "SmolLM2-135M-Instruct", "--backend", "local"],
        {},
        "is a base model",
    ),
}


def _make(root: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        elif content.startswith("->"):
            path.symlink_to(content[2:])
        else:
            path.write_text(content, encoding="utf-8")


def _snapshot(root: Path) -> dict[str, bytes | str | None]:
    out: dict[str, bytes | str | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith("gf-home"):
            continue  # the data directory a local command may set up
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = None
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_error_line_and_changes_nothing(name, tmp_path):
    files, argv, env_extra, expected = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    _make(work, files)
    before = _snapshot(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["GPT_FINETUNE_HOME"] = str(work / "gf-home")
    env.update({k: str(work / v) for k, v in env_extra.items()})
    run = subprocess.run([CLI, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    err_lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in err_lines if line.startswith("Error: ")]
    assert run.returncode == 1, run.stderr
    assert len(errors) == 1 and expected in errors[0], run.stderr
    after_error = err_lines[err_lines.index(errors[0]) + 1 :]
    assert all(line.startswith("Hint: ") for line in after_error) and len(after_error) <= 1, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert _snapshot(work) == before  # inputs and existing outputs untouched, nothing new
    uploads = work / "gf-home" / "files"
    assert not uploads.is_dir() or not any(uploads.iterdir())  # refused before anything was uploaded


def test_output_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "in.jsonl").write_text(GOOD)
    (tmp_path / "real.jsonl").write_text("old\n")
    (tmp_path / "out.jsonl").symlink_to("real.jsonl")
    run = subprocess.run([CLI, "prepare", "-i", "in.jsonl", "-o", "out.jsonl"], cwd=tmp_path, capture_output=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.jsonl").is_symlink() and os.readlink(tmp_path / "out.jsonl") == "real.jsonl"
    assert (tmp_path / "real.jsonl").read_text() == GOOD  # chat JSONL in, the same out


def test_output_to_a_fifo_writes_through_and_keeps_the_fifo(tmp_path):
    (tmp_path / "in.jsonl").write_text(GOOD)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    run = subprocess.run(
        [CLI, "prepare", "-i", "in.jsonl", "-o", "pipe"], cwd=tmp_path, capture_output=True, timeout=60
    )
    reader.join(timeout=30)
    assert run.returncode == 0, run.stderr
    assert got == [GOOD.encode()]
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "pipe"]


def test_a_failed_commit_puts_every_replaced_output_back(tmp_path, monkeypatch):
    """The group's rename of its second output fails: the first is restored, no temporary files stay."""
    from gpt_finetune import atomic

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("old a\n")
    b.write_text("old b\n")
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        with atomic.atomic_outputs() as group:
            with group.open(a) as fh:
                fh.write("new a\n")
            with group.open(b) as fh:
                fh.write("new b\n")
    assert a.read_text() == "old a\n" and b.read_text() == "old b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_auto_backend_without_the_local_engine_fails_before_uploading(tmp_path, monkeypatch, capsys):
    """The seed's install (core only, no torch) and no API key: not a local job that cannot train."""
    from gpt_finetune import base_catalog as catalog
    from gpt_finetune.cli.main import main

    monkeypatch.setattr(catalog, "missing_engine_packages", lambda: ["torch", "trl"])
    (tmp_path / "in.jsonl").write_text(GOOD)
    assert main(["finetune", "-d", str(tmp_path / "in.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "Error: no OpenAI API key is set, and the local engine is not installed (missing: torch, trl)" in err
    assert "OPENAI_API_KEY" in err and "gpt-finetune[local]" in err
    home = Path(os.environ["GPT_FINETUNE_HOME"])
    assert not (home / "files").exists() or not any((home / "files").iterdir())  # nothing uploaded


def test_a_local_job_whose_engine_is_missing_is_refused_at_creation(tmp_path, monkeypatch):
    from gpt_finetune import base_catalog as catalog
    from gpt_finetune.errors import DependencyError
    from gpt_finetune.services import Services

    services = Services.open(tmp_path / "home")
    file_id = services.files.create_from_path(Path(_write_good(tmp_path)))["id"]
    monkeypatch.setattr(catalog, "missing_engine_packages", lambda: ["peft"])
    with pytest.raises(DependencyError, match=r"missing: peft"):
        services.jobs.create(model="gpt-4o-mini", training_file=file_id, start=False)
    assert services.store.query("SELECT count(*) AS n FROM jobs")[0]["n"] == 0


def _write_good(tmp_path: Path) -> str:
    path = tmp_path / "good.jsonl"
    path.write_text(GOOD)
    return str(path)


def test_validate_reports_a_deeply_nested_record_as_a_finding(tmp_path):
    (tmp_path / "deep.jsonl").write_text(GOOD + DEEP_LINE)
    run = subprocess.run([CLI, "validate", "deep.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.stderr + run.stdout
    out = run.stdout + run.stderr
    assert "deep.jsonl:13: error [invalid_json]: invalid JSON: nested too deeply" in out


def test_standard_output_on_a_full_device_is_one_error_line(tmp_path):
    (tmp_path / "in.jsonl").write_text(GOOD)
    with open("/dev/full", "w") as full:
        run = subprocess.run(
            [CLI, "prepare", "-i", "in.jsonl", "-o", "-"],
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error: ")]
    assert run.returncode == 1 and len(errors) == 1 and "No space left" in errors[0], run.stderr
    assert "Traceback" not in run.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
