from __future__ import annotations

import json

import pytest
from conftest import chat_example, write_jsonl

from gpt_finetune.cli.main import main
from gpt_finetune.data.analysis import analyze_file


def codes(report):
    return {(f.code, f.line, f.field) for f in report.findings}


def test_clean_file_passes(chat_file, capsys):
    assert main(["validate", str(chat_file)]) == 0
    assert "OK:" in capsys.readouterr().out


BAD = [
    ("[1, 2]", "data_type", None),
    ({"prompt": "x"}, "missing_messages_list", "messages"),
    (
        {"messages": [{"content": "x"}, {"role": "assistant", "content": "a"}]},
        "message_missing_key",
        "messages[0].role",
    ),
    (
        {"messages": [{"role": "user", "content": "x", "extra": 1}, {"role": "assistant", "content": "a"}]},
        "message_unrecognized_key",
        "messages[0].extra",
    ),
    (
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]},
        "unrecognized_role",
        "messages[0].role",
    ),
    (
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
        "missing_content",
        "messages[0].content",
    ),
    ({"messages": [{"role": "user", "content": "x"}]}, "example_missing_assistant_message", "messages"),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a", "weight": 2}]},
        "invalid_weight",
        "messages[1].weight",
    ),
    (
        {"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "a"}]},
        "invalid_weight",
        "messages[0].weight",
    ),
    ("{not json", "invalid_json", None),
]


@pytest.mark.parametrize("bad, code, field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_each_error_category_names_file_line_and_field(tmp_path, capsys, bad, code, field):
    rows = [json.dumps(chat_example(i)) for i in range(11)]
    rows.insert(4, bad if isinstance(bad, str) else json.dumps(bad))
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(rows) + "\n")
    report = analyze_file(path)
    assert (code, 5, field) in codes(report)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:5" in out and f"[{code}]" in out


def test_assistant_tool_call_without_content_is_fine(tmp_path):
    ex = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    path = write_jsonl(tmp_path / "t.jsonl", [ex] + [chat_example(i) for i in range(10)])
    report = analyze_file(path)
    assert report.n_errors == 0


def test_too_few_examples(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat_example(i) for i in range(9)])
    assert ("invalid_n_examples", None, None) in codes(analyze_file(path))


def test_token_limit_is_a_warning(tmp_path):
    rows = [chat_example(i) for i in range(10)]
    rows[3]["messages"][1]["content"] = "word " * 17000
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    report = analyze_file(path, "gpt-3.5-turbo")
    assert report.n_errors == 0
    assert ("too_many_tokens", 4, "messages") in codes(report)
    assert ("too_many_tokens", 4, "messages") not in codes(analyze_file(path, "gpt-4o-mini"))


def test_duplicates_name_the_original(tmp_path):
    rows = [chat_example(i) for i in range(10)] + [chat_example(2)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    dups = [f for f in analyze_file(path).findings if f.code == "duplicate_example"]
    assert len(dups) == 1 and dups[0].line == 11 and "line 3" in dups[0].message


def test_label_drift_between_training_and_validation(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", [chat_example(i, ["'proxy'", "'ovs'"][i % 2]) for i in range(20)])
    valid = write_jsonl(
        tmp_path / "v.jsonl", [chat_example(i, ["'proxy'", "'windows'"][i % 2]) for i in range(100, 112)]
    )
    assert main(["validate", str(train), "--validation-file", str(valid)]) == 0  # drift warns, it is no error
    out = capsys.readouterr().out
    assert "never seen in training: windows" in out and "absent from validation: ovs" in out


def test_json_output(tmp_path, capsys):
    rows = [chat_example(i) for i in range(10)] + [{"messages": [{"role": "user", "content": "x"}]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert main(["validate", str(path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["findings"][0]["code"] == "example_missing_assistant_message" and doc["findings"][0]["line"] == 11


def test_parallel_and_inline_agree(tmp_path):
    rows = [chat_example(i) for i in range(3000)] + [chat_example(5)] + [{"messages": []}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    a, b = analyze_file(path, workers=1), analyze_file(path, workers=2)
    assert codes(a) == codes(b) and list(a.tokens) == list(b.tokens) and a.n_examples == b.n_examples == 3001
