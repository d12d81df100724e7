"""The trainer on a tiny model built from a config, with the default model's real tokenizer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

from conftest import TOY_ANSWERS, toy_examples, train_spec, write_jsonl

from gpt_finetune.local.chat_data import IGNORE, tokenize_example
from gpt_finetune.local.trainer import Hooks, train


def test_loss_mask_covers_assistant_answers_and_their_end_token_only(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "not this", "weight": 0},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "this one"},
    ]
    row = tokenize_example(tok, messages)
    labels = row["labels"]
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    assert 0 < len(trained) < len(labels)  # neither all nor nothing
    assert tok.decode([labels[i] for i in trained]) == "this one<|im_end|>"
    assert trained == list(range(trained[0], trained[-1] + 1))  # one contiguous span
    no_weight = tokenize_example(tok, [{k: v for k, v in m.items() if k != "weight"} for m in messages])
    assert tok.decode([t for t in no_weight["labels"] if t != IGNORE]) == "not this<|im_end|>this one<|im_end|>"


class Snapshot:
    """A callback that keeps the trainable parameters at the start and at the end of training."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                outer.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

            def on_train_end(self, args, state, control, model=None, **kw):
                outer.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        self.callback = CB()


def test_lora_training_lowers_the_loss_changes_every_lora_weight_and_saves_the_adapter(tmp_path, tiny_model_dir):
    metrics, checkpoints = [], []
    snap = Snapshot()
    hooks = Hooks(on_metrics=metrics.append, on_checkpoint=lambda s, p, m: checkpoints.append(s))
    result = train(train_spec(tmp_path, tiny_model_dir, learning_rate=5e-2), hooks, [snap.callback])
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    # a random model's loss starts at ln(vocab) ~ 10.8; LoRA on attention moves it slowly, but surely
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert all(m["total_steps"] == 36 for m in metrics) and metrics[-1]["step"] == 36
    assert snap.before and all("lora" in n for n in snap.before)
    unchanged = [n for n in snap.before if (snap.before[n] == snap.after[n]).all()]
    assert unchanged == []
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert checkpoints == [6, 12, 18, 24, 30, 36]  # one per epoch
    assert len(list((tmp_path / "ckpt").glob("checkpoint-*"))) == 3  # the last 3 kept
    assert result.global_step == 36 and not result.stopped


def test_all_linear_adapts_every_linear_layer_but_the_output_one(tmp_path, tiny_model_dir):
    import json

    spec = train_spec(
        tmp_path, tiny_model_dir, n_examples=4, n_epochs=1, lora={"r": 4, "alpha": 8, "target_modules": ["all-linear"]}
    )
    train(spec, Hooks())
    adapted = {
        n.rsplit(".", 1)[-1]
        for n in json.loads((tmp_path / "final" / "adapter_config.json").read_text())["target_modules"]
    }
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_same_seed_same_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    train(train_spec(a, tiny_model_dir, n_epochs=1), Hooks())
    train(train_spec(b, tiny_model_dir, n_epochs=1), Hooks())
    wa, wb = load_file(a / "final" / "adapter_model.safetensors"), load_file(b / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


class EvaluationCounter:
    """A trainer callback counting evaluation passes (TrainerCallback's other hooks do nothing)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        self.count = 0
        self._base = TrainerCallback()

    def __getattr__(self, name):
        return getattr(self._base, name)

    def on_evaluate(self, args, state, control, **kw):
        self.count += 1


def test_validation_metrics_and_full_finetune_learns_to_stop(tmp_path, tiny_model_dir):
    from gpt_finetune.home import Home
    from gpt_finetune.local.inference import Engine

    valid = write_jsonl(tmp_path / "valid.jsonl", toy_examples(8))
    metrics = []
    result = train(
        train_spec(
            tmp_path,
            tiny_model_dir,
            training_type="full",
            learning_rate=3e-3,
            n_epochs=30,
            validation_file=str(valid),
            log_every_steps=10,
            # one micro-batch a step whatever this process's memory (the plan's budget depends on
            # it): accumulation is exact only up to float rounding, and the greedy answers checked
            # below are decided by 30 epochs of it
            micro_batch_tokens=100_000,
        ),
        Hooks(on_metrics=metrics.append),
        extra_callbacks=[evaluations := EvaluationCounter()],
    )
    assert any("valid_loss" in m and "valid_mean_token_accuracy" in m for m in metrics)
    assert result.full_valid_loss is not None and result.full_valid_loss < 1.0
    # the last epoch's evaluation is the full validation loss: one evaluation per epoch, not one more
    assert evaluations.count == 30
    last = [m for m in metrics if "valid_loss" in m][-1]
    assert last["step"] == result.global_step and last["valid_loss"] == result.full_valid_loss
    engine = Engine(Home(tmp_path / "home"))
    msgs = [{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": "thing 1"}]
    base = engine.complete(str(tiny_model_dir), None, msgs, max_tokens=12, temperature=0)
    tuned = engine.complete(str(tiny_model_dir), str(tmp_path / "final"), msgs, max_tokens=12, temperature=0)
    assert tuned.text != base.text
    assert base.finish_reason == "length"  # the random model rambles on
    again = engine.complete(str(tiny_model_dir), None, msgs, max_tokens=12, temperature=0)
    assert again.text == base.text  # the adapter loaded meanwhile is off for the base model
    assert tuned.finish_reason == "stop" and len(tuned.token_ids) < 12  # EOS learnt
    assert tuned.text.strip() == TOY_ANSWERS[1]
    streamed = "".join(engine.stream(str(tiny_model_dir), str(tmp_path / "final"), msgs, max_tokens=12, temperature=0))
    assert streamed.strip() == tuned.text.strip()


def test_examples_with_nothing_to_learn_are_skipped(tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer

    from gpt_finetune.errors import DataError
    from gpt_finetune.local.chat_data import tokenize_file

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    rows = toy_examples(3)
    rows[1]["messages"][-1]["weight"] = 0
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert len(tokenize_file(tok, str(path)).rows) == 2
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match="no example has a trainable"):
        tokenize_file(tok, str(path))


def test_engine_switches_adapters_off_for_the_base_model(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gpt_finetune.home import Home
    from gpt_finetune.local.inference import Engine

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")  # random, non-zero: changes outputs
    engine = Engine(Home(tmp_path / "home"))
    msgs = [{"role": "user", "content": "thing 1"}]
    ask = lambda adapter: engine.complete(str(tiny_model_dir), adapter, msgs, max_tokens=8, temperature=0).text  # noqa: E731
    base = ask(None)
    tuned = ask(str(tmp_path / "adapter"))
    assert tuned != base
    assert ask(None) == base
    assert ask(str(tmp_path / "adapter")) == tuned


def test_torch_compile_compiles_each_layer_and_trains_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    """torch_compile compiles the decoder layers one by one (the packed attention between them
    stays eager) and trains the same adapter as the eager run up to float rounding; without a
    C++ compiler on the CPU the job says so and trains uncompiled."""
    import shutil

    import torch
    from safetensors.torch import load_file

    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        (tmp_path / name).mkdir()
        messages: list[str] = []
        train(
            train_spec(tmp_path / name, tiny_model_dir, n_epochs=1, torch_compile=compile_),
            Hooks(on_message=messages.append),
        )
        runs[name] = (load_file(tmp_path / name / "final" / "adapter_model.safetensors"), messages)
    (eager, eager_msgs), (compiled, compiled_msgs) = runs["eager"], runs["compiled"]
    start = next(m for m in compiled_msgs if m.startswith("Training "))
    assert "2 layers compiled" in start and "compiled" not in next(m for m in eager_msgs if m.startswith("Training "))
    assert eager.keys() == compiled.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-5)

    torch._dynamo.reset()
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda c, *a, **kw: None if c.endswith("++") else real_which(c, *a, **kw))
    monkeypatch.delenv("CXX", raising=False)
    (tmp_path / "none").mkdir()
    messages = []
    result = train(
        train_spec(tmp_path / "none", tiny_model_dir, n_epochs=1, torch_compile=True), Hooks(on_message=messages.append)
    )
    assert result.global_step > 0
    assert any("no C++ compiler found" in m and "training uncompiled" in m for m in messages)
    assert "compiled" not in next(m for m in messages if m.startswith("Training "))
