"""``-`` for standard input and output, through the real entry point and real pipes."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import EXAMPLES

SPOOL = "gpt-finetune-stdio"  # the temporary directory's prefix: never shown to the user


def gft(*args, stdin: bytes = b"", cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "gpt_finetune", *map(str, args)], input=stdin, capture_output=True, cwd=cwd
    )


def test_prepare_from_stdin_to_stdout_equals_file_to_file(tmp_path):
    raw = (EXAMPLES / "issues.json").read_bytes()
    by_file = tmp_path / "out.jsonl"
    assert (
        gft("prepare", "-i", EXAMPLES / "issues.json", "-o", by_file, "--task-type", "classification").returncode == 0
    )
    r = gft("prepare", "-i", "-", "-o", "-", "--task-type", "classification", stdin=raw, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == by_file.read_bytes()  # the messages went to stderr, only the data to stdout
    err = r.stderr.decode()
    assert "to <stdout>" in err and "not saved (the output is standard output)" in err and SPOOL not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.labels.json"]


def test_split_to_stdout_needs_a_validation_file(tmp_path):
    raw = (EXAMPLES / "issues.json").read_bytes()
    r = gft("prepare", "-i", "-", "-o", "-", "--split", "0.2", stdin=raw)
    assert r.returncode == 1 and r.stdout == b""
    assert "--validation-output" in r.stderr.decode()
    valid = tmp_path / "v.jsonl"
    r = gft("prepare", "-i", "-", "-o", "-", "--split", "0.2", "--validation-output", valid, stdin=raw)
    assert r.returncode == 0, r.stderr
    n_train, n_valid = len(r.stdout.splitlines()), len(valid.read_text().splitlines())
    assert n_train + n_valid == len(json.loads(raw)) and n_valid > 0


def test_bad_stdin_names_stdin_and_leaves_the_output_alone(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    r = gft("prepare", "-i", "-", "-o", out, stdin=b"not data\n")
    assert r.returncode == 1 and r.stdout == b""
    err = r.stderr.decode()
    assert err.startswith("Error: <stdin>:1: does not look like JSON") and SPOOL not in err
    assert out.read_text() == "precious\n"


def test_a_failed_prepare_to_stdout_prints_no_data():
    good = json.dumps({"id": "1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    r = gft("prepare", "-i", "-", "-o", "-", "--format", "seed", stdin=(good + "\n{broken\n").encode())
    assert r.returncode == 1 and r.stdout == b""  # the good first record is not half-written
    assert "<stdin>:2" in r.stderr.decode()


def test_validate_and_stats_read_stdin(chat_file):
    lines = chat_file.read_bytes().splitlines(keepends=True)
    assert len(lines) == 12
    bad = b"".join(lines) + b'{"messages": 3}\n'
    r = gft("validate", "-", stdin=bad)
    out = r.stdout.decode()
    assert r.returncode == 1, out
    assert "<stdin>:13: messages: error [missing_messages_list]" in out and SPOOL not in out
    r = gft("stats", "-", "--no-local", "--json", stdin=b"".join(lines))
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["file"] == "<stdin>" and stats["n_examples"] == 12


def test_stdin_is_read_once():
    r = gft("validate", "-", "--validation-file", "-", stdin=b"{}\n")
    assert r.returncode == 1 and "can be read only once" in r.stderr.decode()
