"""Preference fine-tuning (method dpo): the data, the loss, training and resuming, on a tiny
model built from a config with the default model's real tokenizer."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES, pair, toy_pairs, write_jsonl

from gpt_finetune.data.analysis import analyze_file
from gpt_finetune.data.convert import ConvertOptions
from gpt_finetune.data.prepare import prepare
from gpt_finetune.errors import DataError


# ---- data -------------------------------------------------------------------------------------------
def codes(path) -> list[tuple[str, int | None, str | None]]:
    return [(f.code, f.line, f.field) for f in analyze_file(path, count_tokens=False).errors]


def test_preference_files_get_openais_findings_with_line_and_field(tmp_path):
    good = pair("q", "a", "b")
    rows = [good] * 12
    rows[1] = {
        **good,
        "preferred_output": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "c"}],
    }
    rows[2] = {**good, "non_preferred_output": [{"role": "user", "content": "b"}]}
    rows[3] = {**good, "input": {"messages": [*good["input"]["messages"], {"role": "assistant", "content": "x"}]}}
    rows[4] = {k: v for k, v in good.items() if k != "non_preferred_output"}
    rows[5] = {**good, "non_preferred_output": [{"role": "assistant", "content": "a"}]}
    rows[6] = {**good, "input": {"messages": [{"role": "wizard", "content": "q"}]}}
    rows[7] = {**good, "preferred_output": [{"role": "assistant", "content": "  "}]}
    found = codes(write_jsonl(tmp_path / "p.jsonl", rows))
    assert found == [
        ("invalid_preference_output", 2, "preferred_output"),
        ("invalid_preference_output", 3, "non_preferred_output[0].role"),
        ("input_ends_with_assistant", 4, "input.messages[2]"),
        ("missing_preference_key", 5, "non_preferred_output"),
        ("identical_outputs", 6, "non_preferred_output[0].content"),
        ("unrecognized_role", 7, "input.messages[0].role"),
        ("missing_content", 8, "preferred_output[0].content"),
    ]
    # a file holds one kind of example; the second kind is named where it starts
    mixed = [good] * 11 + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    report = analyze_file(write_jsonl(tmp_path / "m.jsonl", mixed), count_tokens=False)
    assert report.kind == "preference" and [(f.code, f.line) for f in report.errors] == [("mixed_example_kinds", 12)]
    few = analyze_file(write_jsonl(tmp_path / "few.jsonl", [good] * 9), count_tokens=False)
    assert [f.code for f in few.errors] == ["invalid_n_examples"]


def test_a_pair_counts_its_prompt_once_and_both_outputs(tmp_path):
    from gpt_finetune.data.tokens import count_message_tokens, get_encoding

    p = pair("a question of some length", "the preferred answer", "another answer")
    report = analyze_file(write_jsonl(tmp_path / "p.jsonl", [p] * 10), "gpt-4o-mini-2024-07-18")
    enc = get_encoding(report.model.encoding)
    both = [*p["input"]["messages"], *p["preferred_output"], *p["non_preferred_output"]]
    assert list(report.tokens) == [count_message_tokens(both, enc)[0]] * 10
    prompt_and_one = count_message_tokens([*p["input"]["messages"], *p["preferred_output"]], enc)[0]
    assert report.tokens[0] > prompt_and_one  # the second output is billed too


def test_prepare_converts_trl_pairs_with_and_without_a_prompt(tmp_path):
    rows = [
        {"prompt": "Why?", "chosen": "Because.", "rejected": "No."},  # text, explicit prompt
        {
            "prompt": [{"role": "user", "content": "Why?"}],
            "chosen": [{"role": "assistant", "content": "Because."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
        {  # implicit prompt: two whole conversations sharing all but the answer
            "chosen": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
            "rejected": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "No."}],
        },
        pair("Why?", "Because.", "No."),  # OpenAI's own, passed through
    ]
    src = write_jsonl(tmp_path / "raw.jsonl", rows)
    result = prepare(src, tmp_path / "out.jsonl", options=ConvertOptions(sys_prompt="Be brief."))
    assert result.record_format == "preference" and result.n_examples == 4
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want_input = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]}
    for i, o in enumerate(out[:3]):
        assert o == {
            "input": want_input,
            "preferred_output": [{"role": "assistant", "content": "Because."}],
            "non_preferred_output": [{"role": "assistant", "content": "No."}],
        }, i
    assert out[3]["input"]["messages"][0] == {"role": "system", "content": "Answer with a colour."}


@pytest.mark.parametrize(
    ("row", "message", "field"),
    [
        (
            {
                "chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "y"}],
            },
            "do not share their prompt: they differ at message 1",
            "chosen[0]",
        ),
        ({"chosen": "x", "rejected": "y"}, "plain text with no prompt", "prompt"),
        ({"prompt": "A?", "chosen": "x"}, "needs 'rejected'", "rejected"),
        (
            {"prompt": "A?", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
            "must be one assistant answer",
            "chosen",
        ),
    ],
)
def test_prepare_refuses_a_pair_it_cannot_convert_naming_line_and_field(tmp_path, row, message, field):
    src = write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "A?", "chosen": "x", "rejected": "y"}, row])
    with pytest.raises(DataError) as err:
        prepare(src, tmp_path / "out.jsonl", record_format="preference")
    assert message in err.value.message and err.value.line == 2 and err.value.field == field
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written


def test_the_bundled_example_pairs_prepare_and_validate(tmp_path):
    result = prepare(EXAMPLES / "preferences.jsonl", tmp_path / "p.jsonl")
    report = analyze_file(tmp_path / "p.jsonl", count_tokens=False)
    assert result.n_examples == 60 and report.kind == "preference" and not report.errors


# ---- the loss -----------------------------------------------------------------------------------------
def test_packed_sequence_logps_and_the_loss_equal_a_direct_computation(tiny_model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_finetune.local.dpo import dpo_loss, pack_pairs, sequence_logps, tokenize_pair
    from gpt_finetune.local.packing import use_packed_attention

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    use_packed_attention(model)
    rows = [
        tokenize_pair(tok, p, 512) for p in (pair("thing 1", "blue", "a longer wrong answer"), pair("x", "gold", "red"))
    ]
    mb = pack_pairs(rows)
    with torch.no_grad():
        packed = sequence_logps(model, mb)

        def direct(ids, labels):  # one sequence alone, the log-softmax of every position
            logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            return sum(float(logits[k - 1, labels[k]]) for k in range(1, len(ids)) if labels[k] != -100)

        want = [
            [direct(r["chosen_ids"], r["chosen_labels"]), direct(r["rejected_ids"], r["rejected_labels"])] for r in rows
        ]
    assert torch.allclose(packed, torch.tensor(want), atol=1e-4)
    # the chosen answer's prompt is the rejected one's, token for token
    for r in rows:
        n = next(k for k, x in enumerate(r["chosen_labels"]) if x != -100)
        assert r["chosen_ids"][:n] == r["rejected_ids"][:n]
    ref = packed + torch.tensor([[0.3, -0.2], [0.0, 0.5]])
    loss, d = dpo_loss(packed, ref, beta=0.5)
    margin = 0.5 * ((packed[:, 0] - ref[:, 0]) - (packed[:, 1] - ref[:, 1]))
    assert float(loss) == pytest.approx(float(torch.log1p(torch.exp(-margin)).sum()), rel=1e-6)
    assert torch.allclose(d["chosen"] - d["rejected"], margin)


# ---- training -----------------------------------------------------------------------------------------
def dpo_spec(tmp_path, model_dir, **kw):
    from conftest import train_spec

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(16))
    args = dict(training_file=str(data), method="dpo", beta=0.5, n_epochs=3, batch_size=4, learning_rate=2e-2)
    args.update(kw)
    return train_spec(tmp_path, model_dir, **args)


def held_out_preference(model_dir, final_dir=None) -> tuple[float, float]:
    """(accuracy, mean margin) on pairs never trained on: each right answer against wrong answers
    it was not paired with in training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_finetune.local.dpo import preference_accuracy, tokenize_pair
    from gpt_finetune.local.packing import use_packed_attention

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if final_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, final_dir)
    use_packed_attention(model)
    rows = [tokenize_pair(tok, p, 512) for p in toy_pairs(4, shift=1) + toy_pairs(4, shift=2)]
    return preference_accuracy(model, rows, "cpu")


def test_dpo_makes_the_model_prefer_the_chosen_answers_of_held_out_pairs(tmp_path, tiny_model_dir):
    """Fails if the loss is wired the wrong way round: the chosen answers would lose ground."""
    from gpt_finetune.local.trainer import Hooks, train

    before_acc, before_margin = held_out_preference(tiny_model_dir)
    metrics, messages = [], []
    # full training: the reference is the starting weights, computed before the first step
    spec = dpo_spec(tmp_path, tiny_model_dir, training_type="full", learning_rate=1e-2, n_epochs=4)
    result = train(spec, Hooks(on_metrics=metrics.append, on_message=messages.append))
    after_acc, after_margin = held_out_preference(tmp_path / "final")
    assert after_margin > before_margin + 1.0 and after_acc == 1.0 and before_acc < 1.0
    steps = [m for m in metrics if "train_loss" in m]
    assert steps[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts at the reference
    assert steps[-1]["train_loss"] < 0.3 and steps[-1]["rewards/accuracies"] == 1.0
    assert all(k in steps[-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    assert any(m.startswith("Reference log-probabilities of 16 pairs computed") for m in messages)
    assert any("Training 16 preference pairs" in m and "dpo, beta 0.5" in m for m in messages)
    assert result.global_step == 16 and not result.stopped


def test_a_resumed_dpo_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from gpt_finetune.local.trainer import Hooks, train
    from gpt_finetune.worker.train_job import latest_checkpoint

    whole = tmp_path / "whole"
    whole.mkdir()
    train(dpo_spec(whole, tiny_model_dir, n_epochs=2), Hooks())
    cut = tmp_path / "cut"
    cut.mkdir()
    seen = []

    def stop() -> bool:
        seen.append(1)
        return len(seen) >= 3  # after the third step

    first = train(dpo_spec(cut, tiny_model_dir, n_epochs=2), Hooks(should_stop=stop, save_on_stop=lambda: True))
    assert first.stopped and first.global_step == 3
    messages: list[str] = []
    resumed = train(
        dpo_spec(cut, tiny_model_dir, n_epochs=2, resume_from=latest_checkpoint(cut / "ckpt")),
        Hooks(on_message=messages.append),
    )
    assert resumed.global_step == 8 and not any(m.startswith("Reference log-probabilities") for m in messages)
    a = load_file(whole / "final" / "adapter_model.safetensors")
    b = load_file(cut / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---- evaluation ---------------------------------------------------------------------------------------
def test_eval_on_a_preference_file_reports_each_models_preference_from_its_own_logprobs(
    tmp_path, tiny_model_dir, capsys
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_finetune.cli.main import main
    from gpt_finetune.local.dpo import pair_logps, tokenize_pair
    from gpt_finetune.local.packing import use_packed_attention

    pairs = toy_pairs(4, shift=1) + toy_pairs(4, shift=2)
    data = write_jsonl(tmp_path / "held-out.jsonl", pairs)
    report = tmp_path / "report"
    argv = ["eval", "--backend", "local", "-m", str(tiny_model_dir), "-d", str(data), "--json", "--report", str(report)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "preference"
    got = out["results"][str(tiny_model_dir)]
    # the same figures from the model directly: each pair's summed log-probabilities
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    use_packed_attention(model)
    direct = [c - r for c, r in pair_logps(model, [tokenize_pair(tok, p, 2048) for p in pairs], None, "cpu")]
    assert got["n_pairs"] == 8
    assert got["preference_accuracy"] == sum(m > 0 for m in direct) / 8
    assert got["mean_margin"] == pytest.approx(sum(direct) / 8, abs=1e-3)
    assert "prefers the chosen answer" in (report / "report.md").read_text()
