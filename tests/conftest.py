from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own data directory and no OpenAI credentials from the real env."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("GPT_FINETUNE_HOME", str(home))
    for var in list(os.environ):
        if var.startswith("OPENAI_") or (var.startswith("GPT_FINETUNE_") and var != "GPT_FINETUNE_HOME"):
            monkeypatch.delenv(var, raising=False)
    return home


def seed_record(i: int, labels: list[str], text: str | None = None) -> dict:
    return {
        "id": f"identity_{i}",
        "conversations": [
            {"from": "human", "value": text or f"title: issue {i} body: something about {labels[0]} number {i}"},
            {"from": "gpt", "value": str(labels)},
        ],
    }


def chat_example(i: int, answer: str = "'proxy'") -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Label it."},
            {"role": "user", "content": f"title: issue {i}"},
            {"role": "assistant", "content": answer},
        ]
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    labels = ["'proxy'", "'ovs'", "'proxy','windows'"]
    return write_jsonl(tmp_path / "train.jsonl", [chat_example(i, labels[i % 3]) for i in range(12)])


sys.path.insert(0, str(Path(__file__).parent))
