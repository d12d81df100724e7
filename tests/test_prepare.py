from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT, seed_record, write_jsonl

from gpt_finetune.data.convert import ConvertOptions
from gpt_finetune.data.prepare import prepare


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_seed_example_with_seed_cfg_via_the_seed_script(tmp_path):
    out = tmp_path / "output.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_process.py"),
            "-i",
            str(EXAMPLES / "issues.json"),
            "-o",
            str(out),
            "-c",
            str(EXAMPLES / "data_process.cfg"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    raw = json.loads((EXAMPLES / "issues.json").read_text())
    assert len(rows) == len(raw) >= 150
    first = rows[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[0]["content"] == "Label this Antrea GitHub issue with its area labels."
    assert first[1]["content"] == raw[0]["conversations"][0]["value"]
    # the seed's label style: brackets and separator spaces removed
    assert first[2]["content"] == ",".join(f"'{x}'" for x in eval_free(raw[0]["conversations"][1]["value"]))
    sidecar = json.loads((tmp_path / "output.labels.json").read_text())
    assert len(sidecar["labels"]) == 8 and sum(sidecar["counts"].values()) > len(rows)  # some are multi-label


def eval_free(text):
    from gpt_finetune.data.labels import parse_labels

    return parse_labels(text)


def test_long_flags_work_too(tmp_path):
    out = tmp_path / "o.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_process.py"),
            "--input",
            str(EXAMPLES / "issues.json"),
            "--output",
            str(out),
            "--config",
            str(EXAMPLES / "data_process.cfg"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(out)) >= 150


def test_seed_jsonl_multi_turn_keeps_every_turn_and_maps_roles(tmp_path):
    rec = {
        "id": "x",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "user", "value": "and?"},
            {"from": "assistant", "value": "done"},
        ],
    }
    src = write_jsonl(tmp_path / "in.jsonl", [rec])
    out = tmp_path / "o.jsonl"
    prepare(src, out, options=ConvertOptions(sys_prompt="ignored: record has its own"))
    msgs = read_jsonl(out)[0]["messages"]
    assert [(m["role"], m["content"]) for m in msgs] == [
        ("system", "Be brief."),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "and?"),
        ("assistant", "done"),
    ]


def test_alpaca(tmp_path):
    src = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
    )
    out = tmp_path / "o.jsonl"
    res = prepare(src, out, options=ConvertOptions(sys_prompt="S"))
    assert res.record_format == "alpaca"
    rows = read_jsonl(out)
    assert rows[0]["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert rows[1]["messages"][1]["content"] == "Say hi"


def test_openai_chat_passes_through(tmp_path):
    ex = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    src = write_jsonl(tmp_path / "c.jsonl", [ex])
    out = tmp_path / "o.jsonl"
    assert prepare(src, out).record_format == "openai"
    assert read_jsonl(out) == [ex]


@pytest.mark.parametrize("delimiter, suffix", [(",", ".csv"), ("\t", ".tsv")])
def test_csv_and_tsv_columns(tmp_path, delimiter, suffix):
    src = tmp_path / f"issues{suffix}"
    with open(src, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(["title", "body", "label"])
        w.writerow(["Egress broken", "multi\nline body", "bug, feature"])
        w.writerow(["How to", "question body", "question"])
    out = tmp_path / "o.jsonl"
    from gpt_finetune.cli.main import main

    code = main(
        [
            "prepare",
            "-i",
            str(src),
            "-o",
            str(out),
            "--prompt-columns",
            "title,body",
            "--label-column",
            "label",
            "--task-type",
            "classification",
            "--label-format",
            "json",
            "--sys-prompt",
            "Label it",
        ]
    )
    assert code == 0
    rows = read_jsonl(out)
    assert rows[0]["messages"][1]["content"] == "title: Egress broken body: multi\nline body"
    assert rows[0]["messages"][2]["content"] == '["bug", "feature"]'
    assert rows[1]["messages"][2]["content"] == '["question"]'


def test_csv_without_columns_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "x.csv"
    src.write_text("a,b\n1,2\n")
    from gpt_finetune.cli.main import main

    assert main(["prepare", "-i", str(src), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert "--prompt-columns" in capsys.readouterr().err


@pytest.mark.parametrize(
    "style, expected", [("seed", "'proxy','transit'"), ("json", '["proxy", "transit"]'), ("comma", "proxy, transit")]
)
def test_label_formats(tmp_path, style, expected):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([seed_record(1, ["proxy", "transit", "proxy"])]))
    out = tmp_path / "o.jsonl"
    prepare(src, out, options=ConvertOptions(task_type="classification", label_format=style))
    assert read_jsonl(out)[0]["messages"][-1]["content"] == expected


def _labelled(n_per_label):
    records, i = [], 0
    for label, n in n_per_label.items():
        for _ in range(n):
            i += 1
            records.append(seed_record(i, label.split("+")))
    return records


def test_split_is_stratified_and_deterministic(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(_labelled({"a": 50, "b": 30, "c": 20, "a+b": 10, "solo": 1})))
    opts = ConvertOptions(task_type="classification")
    r1 = prepare(src, tmp_path / "o1.jsonl", options=opts, split=0.1, seed=7)
    prepare(src, tmp_path / "o2.jsonl", options=opts, split=0.1, seed=7)
    prepare(src, tmp_path / "o3.jsonl", options=opts, split=0.1, seed=8)
    assert (r1.n_train, r1.n_valid) == (100, 11)
    v1 = (tmp_path / "o1.valid.jsonl").read_text()
    assert v1 == (tmp_path / "o2.valid.jsonl").read_text()
    assert v1 != (tmp_path / "o3.valid.jsonl").read_text()
    answers = [r["messages"][-1]["content"] for r in read_jsonl(tmp_path / "o1.valid.jsonl")]
    assert answers.count("'a'") == 5 and answers.count("'b'") == 3 and answers.count("'c'") == 2
    assert answers.count("'a','b'") == 1 and "'solo'" not in answers  # a single example stays in training
    train = read_jsonl(tmp_path / "o1.jsonl")
    assert len(train) == 100 and not (
        {json.dumps(t) for t in train} & {json.dumps(v) for v in read_jsonl(tmp_path / "o1.valid.jsonl")}
    )


def test_parallel_workers_give_identical_output(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [seed_record(i, ["x", "y"][i % 2 : i % 2 + 1]) for i in range(5000)])
    opts = ConvertOptions(task_type="classification", sys_prompt="S")
    prepare(src, tmp_path / "one.jsonl", options=opts, workers=1)
    prepare(src, tmp_path / "two.jsonl", options=opts, workers=2)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()


def test_output_equal_to_input_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [seed_record(1, ["a"])])
    from gpt_finetune.errors import DataError

    with pytest.raises(DataError, match="overwrite the input"):
        prepare(src, src)


def test_output_has_ordinary_permissions(tmp_path):
    import os

    src = write_jsonl(tmp_path / "in.jsonl", [seed_record(1, ["a"])])
    out = tmp_path / "o.jsonl"
    prepare(src, out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
