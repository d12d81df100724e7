"""Each kind of bad input: one clear error naming the place, exit code 1, no traceback, and no
partial output (an existing output file is left as it was)."""

from __future__ import annotations

import json

import pytest
from conftest import seed_record

from gpt_finetune.cli.main import main, run_seed


def run_prepare(capsys, src, out, *extra):
    code = main(["prepare", "-i", str(src), "-o", str(out), *extra])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def existing_output(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    return out


def assert_clean_failure(code, err, out, place):
    assert code == 1
    assert err.startswith("Error: ")
    assert place in err
    assert "Traceback" not in err
    assert out.read_text() == "precious\n"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".out")] == []


def test_empty_file(tmp_path, capsys, existing_output):
    src = tmp_path / "in.json"
    src.write_text("  \n")
    code, err = run_prepare(capsys, src, existing_output)
    assert_clean_failure(code, err, existing_output, f"{src}: file is empty")


def test_non_utf8_bytes_name_the_line(tmp_path, capsys, existing_output):
    src = tmp_path / "in.jsonl"
    good = json.dumps(seed_record(1, ["a"])).encode()
    src.write_bytes(good + b"\n" + good.replace(b"issue", b"issu\xe9") + b"\n")
    code, err = run_prepare(capsys, src, existing_output)
    assert_clean_failure(code, err, existing_output, f"{src}:2: not UTF-8")


def test_non_utf8_in_json_array(tmp_path, capsys, existing_output):
    src = tmp_path / "in.json"
    src.write_bytes(b'[\n{"id": 1,\n "conversations": "\xff"}]')
    code, err = run_prepare(capsys, src, existing_output)
    assert_clean_failure(code, err, existing_output, f"{src}:3: not UTF-8")


def test_json_array_given_to_validate(tmp_path, capsys):
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps([{"messages": []}], indent=1))
    code = main(["validate", str(src)])
    err = capsys.readouterr().err
    assert code == 1 and "not JSONL" in err and f"{src}:1" in err and "Traceback" not in err


def test_pretty_printed_object_as_jsonl(tmp_path, capsys, existing_output):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(seed_record(1, ["a"]), indent=1))
    code, err = run_prepare(capsys, src, existing_output)
    assert_clean_failure(code, err, existing_output, f"{src}:1: invalid JSON")
    assert "pretty-printed" in err


def test_truncated_json_array(tmp_path, capsys, existing_output):
    src = tmp_path / "in.json"
    text = json.dumps([seed_record(1, ["a"]), seed_record(2, ["b"])], indent=1)
    src.write_text(text[: len(text) // 2 + 40])
    code, err = run_prepare(capsys, src, existing_output)
    assert_clean_failure(code, err, existing_output, f"{src}:")
    assert "truncated" in err


def test_truncated_jsonl_last_line(tmp_path, capsys, existing_output):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(seed_record(i, ["a"])) for i in range(3)]
    src.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:30])
    code, err = run_prepare(capsys, src, existing_output)
    assert_clean_failure(code, err, existing_output, f"{src}:3: invalid JSON")
    assert "truncated" in err


def test_record_without_conversations(tmp_path, capsys, existing_output):
    src = tmp_path / "in.json"
    text = json.dumps([seed_record(1, ["a"]), {"id": "x", "turns": []}], indent=1)
    src.write_text(text)
    second = text.split("\n").index(" {", 2) + 1  # the line where the second record starts
    code, err = run_prepare(capsys, src, existing_output, "--format", "seed")
    assert_clean_failure(code, err, existing_output, "conversations")
    assert f"{src}:{second}:" in err


def test_label_that_does_not_parse(tmp_path, capsys, existing_output):
    src = tmp_path / "in.json"
    bad = seed_record(2, ["a"])
    bad["conversations"][1]["value"] = "['proxy', "
    src.write_text(json.dumps([seed_record(1, ["a"]), bad]))
    code, err = run_prepare(capsys, src, existing_output, "--task-type", "classification")
    assert_clean_failure(code, err, existing_output, "messages[1].content")
    assert f"{src}:1" in err and "Hint:" in err


def test_single_50mb_line(tmp_path, capsys, existing_output):
    src = tmp_path / "in.jsonl"
    with open(src, "w") as fh:
        fh.write(json.dumps(seed_record(1, ["a"])) + "\n")
        fh.write('{"id": "big", "conversations": [{"from": "human", "value": "' + "x" * (50 * 1024 * 1024) + '"}]}\n')
    code, err = run_prepare(capsys, src, existing_output)
    assert_clean_failure(code, err, existing_output, f"{src}:2: line is longer than 8 MiB")


def test_single_50mb_record_in_json_array(tmp_path, capsys, existing_output):
    src = tmp_path / "in.json"
    with open(src, "w") as fh:
        fh.write('[{"id": "big", "conversations": [{"from": "human", "value": "' + "x" * (50 * 1024 * 1024) + '"}]}]')
    code, err = run_prepare(capsys, src, existing_output)
    assert_clean_failure(code, err, existing_output, f"{src}:1: record is larger than 8 MiB")


def test_debug_shows_traceback(tmp_path):
    src = tmp_path / "in.json"
    src.write_text("")
    from gpt_finetune.errors import DataError

    with pytest.raises(DataError):
        main(["prepare", "--debug", "-i", str(src), "-o", str(tmp_path / "o.jsonl")])


def test_seed_script_entry_reports_the_same_way(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text("[")
    assert run_seed("prepare", ["-i", str(src), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert "Error:" in capsys.readouterr().err
