from __future__ import annotations

import json
from pathlib import Path

from conftest import chat_example, write_jsonl

from gpt_finetune.cli.main import main
from gpt_finetune.data.analysis import analyze_file
from gpt_finetune.data.stats import job_cost
from gpt_finetune.data.tokens import count_message_tokens, get_encoding
from gpt_finetune.openai_facts import default_epochs, model_info


def test_exact_encodings_offline():
    assert get_encoding("cl100k_base").encode_ordinary("Hello world") == [9906, 1917]
    # o200k_base differs from cl100k_base on the same text
    assert get_encoding("o200k_base").encode_ordinary("Hello world") == [13225, 2375]


def test_models_use_their_own_encoding():
    assert model_info("gpt-3.5-turbo-0125").encoding == "cl100k_base"
    assert model_info("gpt-4o-mini-2024-07-18").encoding == "o200k_base"
    assert model_info("gpt-4.1-mini").price_per_million == 5.0
    assert model_info("gpt-4.1-nano-2025-04-14").example_token_limit == 32768
    assert model_info("ft:gpt-4o-mini:acme:x:abc").name == "gpt-4o-mini"


def test_cookbook_message_count():
    enc = get_encoding("cl100k_base")
    msgs = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hello world", "name": "bob"}]
    total, assistant = count_message_tokens(msgs, enc)
    role_user, role_asst, bob = (len(enc.encode_ordinary(x)) for x in ("user", "assistant", "bob"))
    assert total == 3 + (3 + role_user + 2) + (3 + role_asst + 2 + bob + 1)
    assert assistant == 2


def test_default_epochs_rule():
    assert default_epochs(10) == 10  # raised so that 10 x 10 >= 100
    assert default_epochs(30) == 4  # 30 x 4 = 120 >= 100
    assert default_epochs(200) == 3
    assert default_epochs(10_000) == 2  # lowered so that <= 25,000
    assert default_epochs(2) == 25  # capped at 25
    assert default_epochs(100_000) == 1
    # aimed at 5 (a classification job's): the same bounds
    assert [default_epochs(n, 5) for n in (10, 30, 200, 5_000, 10_000)] == [10, 5, 5, 5, 2]


def test_cost(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat_example(i) for i in range(40)])
    report = analyze_file(path, "gpt-4o-mini")
    cost = job_cost(report)
    assert cost.n_epochs == 3
    assert cost.billed_tokens == 3 * sum(report.tokens)
    assert cost.usd == round(cost.billed_tokens / 1e6 * 3.0, 4)
    assert job_cost(report, 5).billed_tokens == 5 * sum(report.tokens)


def test_stats_command_json(tmp_path, capsys):
    rows = [chat_example(i, ["'proxy'", "'ovs'", "'proxy','windows'"][i % 3]) for i in range(30)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert main(["stats", str(path), "--json", "--no-local", "--model", "gpt-4.1"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n_examples"] == 30 and s["encoding"] == "o200k_base"
    t = s["tokens_per_example"]
    counts = sorted(count_message_tokens(r["messages"], get_encoding("o200k_base"))[0] for r in rows)
    assert (t["min"], t["max"], t["mean"]) == (counts[0], counts[-1], round(sum(counts) / 30, 1))
    assert t["p50"] == counts[round(0.5 * 29)] and t["p95"] == counts[round(0.95 * 29)]
    assert s["labels"] == {"proxy": 20, "ovs": 10, "windows": 10}
    assert s["job"]["n_epochs"] == 4 and s["job"]["cost_usd"] > 0


def test_stats_text(chat_file, capsys):
    assert main(["stats", str(chat_file), "--no-local"]) == 0
    out = capsys.readouterr().out
    assert "12 examples" in out and "billed tokens" in out and "Labels (3)" in out


def test_local_counts_in_the_parallel_pass_equal_the_tokenizers_own(tmp_path, smol_tokenizer_dir):
    """stats' fast local counts (template overhead once per shape, batch encoding, in forked
    workers) against rendering and tokenising every example the trainer's way."""
    import pytest

    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from gpt_finetune.data.local_tokens import LocalCounter
    from gpt_finetune.local.chat_data import IGNORE, tokenize_example
    from gpt_finetune.local.tokenizer import summarize

    rows = [chat_example(i, answer=["'proxy'", "'ovs','cni'", "a longer free answer: yes."][i % 3]) for i in range(40)]
    rows[3]["messages"].insert(0, {"role": "user", "content": "no system message here"})
    rows[3]["messages"] = rows[3]["messages"][1:]  # starts with a user turn: the template adds its own
    rows[5]["messages"][1]["content"] = "  leading and trailing spaces \n"  # the slow, exact path
    rows[7]["messages"] += [{"role": "user", "content": "again?"}, {"role": "assistant", "content": "yes"}]
    rows[7]["messages"][2]["weight"] = 0
    rows[9]["messages"][1]["content"] = "émoji 🎉 and ünïcode, 中文 " * 40
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    counter = LocalCounter(smol_tokenizer_dir, "SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    expected = [tokenize_example(tok, r["messages"]) for r in rows]
    for workers in (1, 2):
        report = analyze_file(path, workers=workers, local=counter)
        assert list(report.local.tokens) == [len(e["input_ids"]) for e in expected]
        assert report.local.assistant == sum(sum(x != IGNORE for x in e["labels"]) for e in expected)
    summary = summarize(counter, report.local, max_length=60)
    assert summary["total_tokens"] == sum(len(e["input_ids"]) for e in expected)
    over = sum(len(e["input_ids"]) > 60 for e in expected)
    assert over > 0 and summary["n_truncated"] + summary["n_too_long"] == over


def test_piece_counts_equal_the_tokenizers_own(smol_tokenizer_dir, monkeypatch):
    """Counting by cached whitespace-led pieces gives exactly the tokenizer's count, on text
    built to break it: whitespace runs of every kind, control characters that Python's \\s
    takes for whitespace but the tokenizer does not, digits, contractions, CRLF, added tokens,
    and with the cache cleared between blocks."""
    import random

    from tokenizers import Tokenizer

    from gpt_finetune.data import local_tokens
    from gpt_finetune.data.local_tokens import (
        LocalCounter,
        _tokenizer_spec,
        digits_are_single_tokens,
        piece_cache_applies,
    )

    alphabet = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u2009", "\u3000", "\u200b"]
    alphabet += [
        "a",
        "Zé",
        "中文",
        "1",
        "2024",
        "'s",
        "'ll",
        "'",
        '"',
        ".",
        ",!",
        "-_",
        "🎉",
        "<|im_end|>",
        "<repo_name>",
    ]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["", "plain words here.", "x" * 500, "http://example.com/a?b=1&c=2 #123", " ", "a  b", " a", "a "]
    words = [a for a in alphabet if a.isprintable() and " " not in a] + ["word", "'re", "12", "x.y"]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(1000)]  # str.split path
    tok = Tokenizer.from_file(str(Path(smol_tokenizer_dir) / "tokenizer.json"))
    expected = [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]

    counter = LocalCounter(smol_tokenizer_dir, "SmolLM2-135M-Instruct")
    assert counter._cache is not None  # the default model's tokenizer takes the fast path
    assert counter._digits is not None  # and its digits are tokens of their own
    monkeypatch.setattr(local_tokens, "CACHE_MAX", 500)  # full after the first block
    got = [n for k in range(0, len(texts), 400) for n in counter._lengths(texts[k : k + 400])]
    assert got == expected
    assert counter._lengths(texts[:400]) == expected[:400]  # again, now through the caches
    assert len(counter._cache) + len(counter._spaced) + len(counter._texts) <= 400 * 41  # the first block's only

    spec = json.loads((Path(smol_tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    assert piece_cache_applies(spec)
    assert _tokenizer_spec(tok)["pre_tokenizer"] == spec["pre_tokenizer"]  # what the counter reads
    for other in (
        {**spec, "normalizer": {"type": "NFC"}},
        {**spec, "pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}},
        {**spec, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}},
    ):
        assert not piece_cache_applies(other)
    assert digits_are_single_tokens(spec)
    assert not digits_are_single_tokens(
        {**spec, "model": {**spec["model"], "vocab": {**spec["model"]["vocab"], "12": 1}}}
    )
    assert not digits_are_single_tokens({**spec, "model": {**spec["model"], "vocab": {"a": 0}}})
