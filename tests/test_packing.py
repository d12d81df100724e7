"""Packed micro-batches, gradient accumulation, the memory plan and answer-keeping truncation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("trl")

from conftest import toy_examples, train_spec, write_jsonl

from gpt_finetune.local.chat_data import IGNORE, TRUNCATION_MARK, fit_messages, tokenize_example, tokenize_file
from gpt_finetune.local.memory import MEASURED_SLACK, MemoryPlanError, make_plan
from gpt_finetune.local.packing import pack, packed_loss, split_by_budget, use_packed_attention
from gpt_finetune.local.trainer import Hooks, train


def uneven_rows(tok):
    """Examples of clearly different lengths, one with two answers."""
    convs = [e["messages"] for e in toy_examples(4)]
    convs[1][1]["content"] = "thing 1, asked at some length " * 6
    convs[2][1]["content"] = "a short one"
    convs[3][1]["content"] = "medium " * 9
    convs.append(
        [
            {"role": "user", "content": "first question, answered early"},
            {"role": "assistant", "content": "early answer"},
            {"role": "user", "content": "and a much longer second question " * 3},
            {"role": "assistant", "content": "late answer"},
        ]
    )
    rows = [tokenize_example(tok, m) for m in convs]
    assert len({len(r["input_ids"]) for r in rows}) >= 3
    return rows


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_has_the_loss_and_gradients_of_the_same_examples_padded(smol_tokenizer_dir, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    rows = uneven_rows(tok)
    # padded: the ordinary way, right-padded with an attention mask and every position projected
    padded_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    logits = padded_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE
    padded_loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum") / keep.sum()
    padded_loss.backward()
    expected = grads(padded_model)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert use_packed_attention(model) == "gptft_packed_sdpa"
    micro = pack(rows)
    assert micro["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))  # one row, no padding
    total, count, _ = packed_loss(model, micro)
    assert int(count) == int(keep.sum())
    (total / count).backward()
    got = grads(model)
    assert torch.allclose(total / count, padded_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == expected.keys() and len(got) > 5
    for name in got:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-7), name


def test_attention_never_crosses_from_one_packed_example_into_the_next(smol_tokenizer_dir, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    rows = uneven_rows(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    use_packed_attention(model)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([rows[2]["input_ids"]])).logits[0]
        other_first = [rows[0], rows[2]]
        micro = pack(other_first)
        packed = model(input_ids=micro["input_ids"], position_ids=micro["position_ids"]).logits[0]
    assert torch.allclose(packed[len(rows[0]["input_ids"]) :], alone, atol=1e-5)


def test_accumulated_micro_batches_train_the_same_weights_as_the_unsplit_step(tmp_path, tiny_model_dir):
    """The trainer's own step, once with every example in its own micro-batch and once unsplit."""
    import torch
    from safetensors.torch import load_file

    rows = toy_examples(12)
    for i, r in enumerate(rows):
        r["messages"][1]["content"] += " and some more words" * (i % 5)  # unequal lengths
    plans = []
    finals = {}
    for name, tokens in (("split", 8), ("whole", 100_000)):
        d = tmp_path / name
        d.mkdir()
        spec = train_spec(
            d,
            tiny_model_dir,
            n_epochs=1,
            micro_batch_tokens=tokens,
            gradient_checkpointing=False,
            lora={"dropout": 0.0},
        )
        write_jsonl(d / "train.jsonl", rows)
        result = train(spec, Hooks(on_plan=plans.append))
        finals[name] = load_file(d / "final" / "adapter_model.safetensors")
        assert result.global_step == 3
    assert plans[0]["max_micro_batches"] == 4 and plans[1]["max_micro_batches"] == 1  # batch 4: 4 vs 1
    a, b = finals["split"], finals["whole"]
    assert a.keys() == b.keys()
    changed = 0
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
        changed += int(not torch.equal(a[key], torch.zeros_like(a[key])))
    assert changed == len(a)  # and the step did train every adapter weight


def test_split_by_budget_keeps_every_item_once_within_the_budget():
    costs = [5, 9, 1, 4, 4, 12, 3]
    groups = split_by_budget(costs, 10)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    assert all(sum(costs[i] for i in g) <= 10 or len(g) == 1 for g in groups)
    assert [5] in groups  # the one too big for any micro-batch goes alone
    assert split_by_budget(costs, 10) == groups  # deterministic
    assert len(split_by_budget([1] * 8, 100)) == 1


SMOL_SHAPE = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)


def plan(examples, **kw):
    args = dict(
        config=SMOL_SHAPE,
        dtype_bytes=4,
        static_bytes=1_000_000_000,
        examples=examples,
        batch_size=8,
        checkpointing=None,
        memory_limit_gb=4.0,
        micro_batch_tokens=None,
    )
    args.update(kw)
    return make_plan(**args)


def test_memory_plan_checkpoints_only_examples_too_long_without_it(monkeypatch):
    monkeypatch.setattr("gpt_finetune.local.memory.available_bytes", lambda: 20_000_000_000)
    short = plan([(600, 3)] * 40)
    assert short.checkpointing == "off" and short.max_micro_batches >= 2  # 8 x 600 tokens do not fit one
    assert short.estimated_peak_bytes <= short.target_bytes
    mixed = plan([(600, 3)] * 40 + [(2000, 3)])
    assert mixed.checkpointing == "auto"
    groups = mixed.micro_batches([(600, 3), (2000, 3), (600, 3)])
    assert ([1], True) in groups and all(not gc for g, gc in groups if g != [1])
    assert mixed.estimated_peak_bytes <= int(0.9 * mixed.target_bytes)
    forced = plan([(600, 3)] * 40, checkpointing=True)
    assert forced.checkpointing == "on" and forced.micro_batch_tokens > 5 * short.micro_batch_tokens
    with pytest.raises(MemoryPlanError, match="not enough memory") as err:
        plan([(600, 3)] * 40 + [(2000, 3)], checkpointing=False)
    assert "gradient_checkpointing" in (err.value.hint or "")
    with pytest.raises(MemoryPlanError, match=r"allows 1\.10 GB"):
        plan([(600, 3)] * 4, memory_limit_gb=1.1)  # less than the model and runtime need
    assert plan([(600, 3)] * 40, micro_batch_tokens=700).micro_batch_tokens == 700


def test_memory_plan_uses_the_bytes_per_token_measured_on_the_model(monkeypatch):
    monkeypatch.setattr("gpt_finetune.local.memory.available_bytes", lambda: 20_000_000_000)
    examples = [(600, 3)] * 40 + [(2000, 3)]
    estimated = plan(examples)
    measured = plan(examples, saved_bytes_per_token=835_000)  # SmolLM2 with the fused layers
    assert measured.per_token_bytes == pytest.approx(835_000 * MEASURED_SLACK, rel=1e-6)
    assert measured.per_token_bytes < estimated.per_token_bytes
    # the 2,000-token example now fits without checkpointing, and micro-batches hold more tokens
    assert estimated.checkpointing == "auto" and measured.checkpointing == "off"
    assert measured.micro_batch_tokens > 2000 > estimated.micro_batch_tokens
    assert measured.estimated_peak_bytes <= int(0.9 * measured.target_bytes)
    # checkpointed: each layer's input plus one layer rebuilt twice
    assert measured.per_token_checkpointed_bytes < measured.per_token_bytes / 5


def test_memory_plan_target_is_lowered_on_a_machine_with_less_free_memory(monkeypatch):
    monkeypatch.setattr("gpt_finetune.local.memory.available_bytes", lambda: 2_000_000_000)
    monkeypatch.setattr("gpt_finetune.local.memory.resident_bytes", lambda: 1_000_000_000)
    p = plan([(300, 3)] * 40)
    assert p.target_bytes == int(0.85 * 3_000_000_000) and "available" in p.target_source


def test_long_prompts_are_cut_in_their_middle_and_answers_kept(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    body = " ".join(f"word{i}" for i in range(600))
    messages = [
        {"role": "system", "content": "Label it."},
        {"role": "user", "content": "title: START OF ISSUE body: " + body + " END OF ISSUE"},
        {"role": "assistant", "content": "'bug'"},
    ]
    fitted, truncated = fit_messages(tok, messages, 300)
    assert truncated
    text = tok.apply_chat_template(fitted, tokenize=False)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 300
    user = fitted[1]["content"]
    assert user.startswith("title: START OF ISSUE") and user.endswith("END OF ISSUE") and TRUNCATION_MARK in user
    assert (
        fitted[2] == messages[2]
        and fitted[0] == messages[0]
        and messages[1]["content"].endswith(body + " END OF ISSUE")
    )
    assert fit_messages(tok, messages, 300) == (fitted, True)  # pure
    assert fit_messages(tok, messages, 5000) == (messages, False)
    row = tokenize_example(tok, messages, 300)
    assert row["truncated"] and len(row["input_ids"]) <= 300
    assert tok.decode([x for x in row["labels"] if x != IGNORE]) == "'bug'<|im_end|>"
    # the prompt alone, as inference shapes it, is cut the same way
    prompt, cut = fit_messages(tok, messages[:2], 280, add_generation_prompt=True)
    assert cut and prompt[1]["content"].startswith("title: START")
    long_answer = [messages[0], {"role": "user", "content": "q"}, {"role": "assistant", "content": body}]
    assert fit_messages(tok, long_answer, 300) is None  # the answer alone does not fit: never cut


def test_tokenize_file_counts_truncated_and_dropped_examples(tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    long_user = " ".join(f"w{i}" for i in range(400))
    rows = toy_examples(3)
    rows[0]["messages"][1]["content"] = long_user
    rows[1]["messages"][2]["content"] = long_user  # an answer longer than max_length
    data = tokenize_file(tok, str(write_jsonl(tmp_path / "t.jsonl", rows)), 200)
    assert (len(data.rows), data.n_truncated, data.n_too_long) == (2, 1, 1)
    assert all(len(r["input_ids"]) <= 200 for r in data.rows)


def test_inference_shortens_a_long_prompt_as_training_did(tmp_path, smol_tokenizer_dir):
    """The engine cuts a long prompt to the fine-tuned model's max_length (less the tokens to
    generate) with the trainer's own function, keeping the prompt's start and end."""
    import json
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from gpt_finetune.home import Home
    from gpt_finetune.local.chat_data import TRAINING_SHAPE
    from gpt_finetune.local.inference import Engine

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / TRAINING_SHAPE).write_text(json.dumps({"max_length": 300}))
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    assert Engine._prompt_limit(model, str(adapter), 20) == 280
    assert Engine._prompt_limit(model, None, 256) == 8192 - 256  # a base model: its context
    engine = Engine(Home(tmp_path / "home"))
    body = " ".join(f"w{i}" for i in range(800))
    msgs = [{"role": "system", "content": "Label it."}, {"role": "user", "content": f"title: FIRST body: {body} LAST"}]
    ids = engine._inputs(tok, msgs, "cpu", 280)["input_ids"][0].tolist()
    assert len(ids) <= 280
    text = tok.decode(ids)
    assert "title: FIRST" in text and "LAST" in text and TRUNCATION_MARK.strip() in text
    assert text.endswith("<|im_start|>assistant\n")  # still a prompt for the answer
    short = engine._inputs(tok, [*msgs[:1], {"role": "user", "content": "short"}], "cpu", 280)["input_ids"]
    assert tok.decode(short[0]).count("short") == 1
