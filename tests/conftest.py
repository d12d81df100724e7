from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# tests never touch the network: the hub libraries (transformers, sentence-transformers, SetFit)
# read this when imported, and then only look at local files
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Base models converted once per test run (the default model's GGUF takes ~30 s)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch, model_cache):
    """Every test gets its own data directory and no OpenAI credentials from the real env."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("GPT_FINETUNE_HOME", str(home))
    monkeypatch.setenv("GPT_FINETUNE_MODEL_CACHE", str(model_cache))
    for var in list(os.environ):
        if var.startswith("OPENAI_") or (
            var.startswith("GPT_FINETUNE_") and var not in ("GPT_FINETUNE_HOME", "GPT_FINETUNE_MODEL_CACHE")
        ):
            monkeypatch.delenv(var, raising=False)
    yield home
    stop_workers(home)


def stop_workers(home: Path) -> None:
    """Kill what a test's jobs left running in its data directory (a runner still training, an
    idle runner waiting to exit): on 2 cores, a leftover training process slows every later test."""
    pattern = rf"gpt_finetune\.worker\.(runner|train_job) --home {re.escape(str(home))}( |$)"
    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    for pid in map(int, pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


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


@pytest.fixture(scope="session")
def smol_tokenizer_dir(model_cache):
    """The default model's real tokenizer and chat template, read from its GGUF file (no Hub)."""
    pytest.importorskip("transformers")
    from gpt_finetune.home import Home
    from gpt_finetune.local.base_weights import DEFAULT_BASE_MODEL, resolve_base, tokenizer_dir

    os.environ["GPT_FINETUNE_MODEL_CACHE"] = str(model_cache)
    return tokenizer_dir(resolve_base(DEFAULT_BASE_MODEL), Home(model_cache / "home"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer_dir):
    """A tiny Llama (hidden size 32, two layers) built from a config, with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


TOY_ANSWERS = ["red", "blue", "green", "gold"]


def toy_examples(n: int = 24) -> list[dict]:
    """Short examples with a learnable mapping: 'colour of thing k' -> a fixed colour."""
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer with a colour."},
                {"role": "user", "content": f"thing {i % 4}"},
                {"role": "assistant", "content": TOY_ANSWERS[i % 4]},
            ]
        }
        for i in range(n)
    ]


def pair(prompt: str, good: str, bad: str) -> dict:
    return {
        "input": {
            "messages": [{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": prompt}]
        },
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


WRONG = ["I do not know", "purple", "maybe", "no colour at all"]


def toy_pairs(n: int, shift: int = 0) -> list[dict]:
    """'thing k' answered with colour k, preferred to a wrong answer (k + shift of ``WRONG``)."""
    return [pair(f"thing {i % 4}", TOY_ANSWERS[i % 4], WRONG[(i + shift) % 4]) for i in range(n)]


def train_spec(tmp_path: Path, model_dir, n_examples: int = 24, **kw):
    """A TrainSpec over toy examples written under tmp_path: 6 epochs of batch 4 unless told."""
    from gpt_finetune.local.trainer import TrainSpec

    data = write_jsonl(tmp_path / "train.jsonl", toy_examples(n_examples))
    args = dict(
        model_dir=str(model_dir),
        training_file=str(data),
        validation_file=None,
        output_dir=str(tmp_path / "ckpt"),
        final_dir=str(tmp_path / "final"),
        n_epochs=6,
        batch_size=4,
        learning_rate=5e-3,
        seed=3,
        log_every_steps=1,
        # these train inside the pytest process, whose resident size (hundreds of models loaded
        # by earlier tests) the memory plan counts as static: a 4 GB target could leave no
        # budget late in a full run. Tests of the plan itself set their own.
        memory_limit_gb=16.0,
    )
    args.update(kw)
    return TrainSpec(**args)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/postgres.py). Skipped where PostgreSQL or
    psycopg is missing, unless GPT_FINETUNE_REQUIRE_POSTGRES is set (CI): then that fails."""
    from postgres import Server

    try:
        import psycopg  # noqa: F401

        server = Server()
        server.start()
    except (ImportError, FileNotFoundError) as exc:
        if os.environ.get("GPT_FINETUNE_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"no PostgreSQL here: {exc}")
    yield server
    server.remove()


@pytest.fixture
def pg_url(postgres, request):
    """The URL of a new, empty database on the session's server, for this test alone."""
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50] + "_" + os.urandom(3).hex()
    return postgres.new_database(name)
