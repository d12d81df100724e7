"""Evaluation: metrics against hand-computed values, the TF-IDF baseline, and label-constrained
prediction on a tiny model (never outside the set; the argmax of separately computed scores)."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from gpt_finetune.eval.metrics import answering_metrics, classification_metrics, token_f1


def test_single_label_metrics_by_hand():
    refs = [["a"], ["a"], ["b"], ["b"], ["c"]]
    preds = [["a"], ["b"], ["b"], ["b"], None]  # the last answer could not be read as labels
    m = classification_metrics(refs, preds, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_label"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_label"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_label"]["c"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m["micro_f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["out_of_set_rate"] == pytest.approx(1 / 5)
    assert m["confusion_matrix"]["labels"] == ["a", "b", "c", "(other)"]
    assert m["confusion_matrix"]["matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert not m["multi_label"] and "hamming_loss" not in m


def test_multi_label_metrics_by_hand():
    refs = [["x", "y"], ["x"], ["y"]]
    preds = [["x"], ["x", "y"], ["y", "z"]]  # z is not a known label
    m = classification_metrics(refs, preds, ["x", "y"])
    assert m["multi_label"] and m["accuracy"] == 0.0
    assert m["per_label"]["x"]["f1"] == pytest.approx(1.0) and m["per_label"]["y"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.75) and m["micro_f1"] == pytest.approx(0.75)
    assert m["samples_jaccard"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert m["samples_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["hamming_loss"] == pytest.approx(2 / 6)
    assert m["out_of_set_rate"] == pytest.approx(1 / 3)


def test_unseen_label_sets_are_counted_by_hand():
    from gpt_finetune.eval.metrics import unseen_combinations

    seen = {frozenset(["x"]), frozenset(["y"]), frozenset(["x", "z"])}
    refs = [["x", "y"], ["y", "x"], ["x"], ["z", "y"]]
    preds = [["y", "x"], ["x"], ["x", "y"], None]
    # answered unseen: {x,y} twice; unseen references: 0, 1, 3; right among them: 0 only
    assert unseen_combinations(refs, preds, seen) == {"answered": 2, "references": 3, "right": 1}


def test_thresholds_are_tuned_per_label_by_f1_and_applied_most_likely_first():
    from gpt_finetune.data.labels import apply_thresholds, tune_thresholds

    refs = [["a"], ["a", "b"], ["b"], ["a"]]
    probs = [{"a": 0.9, "b": 0.1}, {"a": 0.8, "b": 0.3}, {"a": 0.2, "b": 0.9}, {"a": 0.6, "b": 0.35}]
    cuts = tune_thresholds(refs, probs, ["a", "b"])
    # a: any cut between 0.2 and 0.6 separates it perfectly; the midpoint nearest 0.5 is (0.2 + 0.6) / 2
    assert cuts["a"] == pytest.approx(0.4)
    # b: 0.3 is present, 0.35 is not: only cuts above 0.35 or at 0.2 .. 0.3 can be tried; (0.1+0.3)/2 = 0.2
    # takes b at 0.3, 0.35 and 0.9 (F1 0.8), (0.35+0.9)/2 = 0.625 only at 0.9 (F1 0.667)
    assert cuts["b"] == pytest.approx(0.2)
    assert apply_thresholds({"a": 0.45, "b": 0.7}, ["a", "b"], cuts) == ["b", "a"]
    assert apply_thresholds({"a": 0.3, "b": 0.1}, ["a", "b"], {"a": 0.9, "b": 0.9}) == ["a"]  # none passes
    assert tune_thresholds([["a"]], [{"a": 0.7, "b": 0.2}], ["a", "b"])["b"] == 0.5  # b never true


def test_answering_metrics_by_hand():
    assert token_f1("The cat sat", "cat sat down") == pytest.approx(0.8)
    m = answering_metrics(["Paris.", "red blue green gold"], ["paris", "red green gold pink"])
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["token_f1"] == pytest.approx((1 + 0.75) / 2)
    assert m["rouge_l"] == pytest.approx((1 + 0.75) / 2)
    assert m["answer_words"] == pytest.approx((1 + 4) / 2)


@pytest.mark.parametrize("multi", [False, True])
def test_the_bootstrap_interval_matches_scikit_learn_resample_by_resample(multi):
    import random

    import numpy as np
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    from gpt_finetune.eval.metrics import bootstrap_macro_f1_difference

    rng = random.Random(3)
    labels = ["a", "b", "c", "d"]
    refs = [rng.sample(labels, rng.randint(1, 2) if multi else 1) for _ in range(50)]
    pred_a = [rng.sample(labels, 1) if rng.random() > 0.1 else None for _ in refs]
    pred_b = [r if rng.random() > 0.4 else [rng.choice([*labels, "unknown"])] for r in refs]
    point, lo, hi = bootstrap_macro_f1_difference(refs, pred_a, pred_b, labels, n=200, seed=5)
    # the same resamples, scored one by one by scikit-learn
    binarizer = MultiLabelBinarizer(classes=labels)
    y = binarizer.fit_transform(refs)
    ya = binarizer.transform([[x for x in p or [] if x in labels] for p in pred_a])
    yb = binarizer.transform([[x for x in p or [] if x in labels] for p in pred_b])
    draws = np.random.default_rng(5).integers(0, len(y), size=(200, len(y)))

    def f1(t, p):
        return f1_score(t, p, average="macro", zero_division=0)

    diffs = [f1(y[i], ya[i]) - f1(y[i], yb[i]) for i in draws]
    assert point == pytest.approx(f1(y, ya) - f1(y, yb))
    assert (lo, hi) == pytest.approx((np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)))
    assert lo < point < hi


def test_tfidf_baseline_learns_separable_labels():
    from gpt_finetune.eval.baseline import TfidfBaseline

    words = {"bug": "crash error exception", "feature": "please add support", "question": "how do i"}
    prompts = [f"{words[k]} item {i}" for i in range(10) for k in words]
    labels = [[k] for _ in range(10) for k in words]
    model = TfidfBaseline().fit(prompts, labels, list(words))
    assert model.predict(["the app shows an error and a crash", "how do i configure it"]) == [["bug"], ["question"]]
    multi = TfidfBaseline().fit(
        prompts + ["crash error please add support"] * 5, labels + [["bug", "feature"]] * 5, list(words)
    )
    assert multi.predict(["crash error please add support"]) == [["bug", "feature"]]


def test_the_svm_baseline_reads_character_ngrams_words_miss():
    """Labels carried by identifiers inside words (``NodePortLocal``, ``nplctl``): whole-word
    features never see a shared token, character n-grams do."""
    from gpt_finetune.eval.baseline import SvmBaseline, TfidfBaseline

    prompts = [f"crashinNodePortLocalv{i}" for i in range(12)] + [f"slowWindowsHostv{i}" for i in range(12)]
    labels = [["npl"]] * 12 + [["windows"]] * 12
    svm = SvmBaseline().fit(prompts, labels, ["npl", "windows"])
    held = ["pleasefixNodePortLocalnow", "aWindowsHostquestion"]
    assert svm.predict(held) == [["npl"], ["windows"]]
    words = TfidfBaseline().fit(prompts, labels, ["npl", "windows"])
    assert words.predict(held) != [["npl"], ["windows"]]  # every held-out word is new to it
    multi = SvmBaseline().fit(
        prompts + ["NodePortLocalWindowsHost"] * 6, labels + [["npl", "windows"]] * 6, ["npl", "windows"]
    )
    assert multi.predict(["NodePortLocalWindowsHostagain"]) == [["npl", "windows"]]


WORDS = "the proxy drops packets crash windows host slow agent restarts please add option how do i".split()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A sentence-transformers encoder built from a config (no hub): a 2-layer BERT over a tiny
    word vocabulary, mean pooling."""
    pytest.importorskip("setfit")
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("encoder")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab)
    assert tokenizer("proxy windows")["input_ids"] == [2, vocab["proxy"], vocab["windows"], 3]
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,  # random words far apart: the test is of SetFit, not of a trained encoder
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    word = models.Transformer(str(root / "bert"))
    SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension())]).save(str(root / "st"))
    return root / "st"


def test_the_setfit_baseline_learns_separable_labels_single_and_multi(tiny_encoder, tmp_path, monkeypatch):
    from gpt_finetune.eval.baseline import SetfitBaseline

    monkeypatch.chdir(tmp_path)  # SetFit's own default would leave ./checkpoints behind

    prompts = ["the proxy drops packets", "proxy packets drops", "windows host slow", "slow windows host"] * 4
    labels = [["proxy"], ["proxy"], ["windows"], ["windows"]] * 4
    single = SetfitBaseline(str(tiny_encoder), iterations=5).fit(prompts, labels, ["proxy", "windows"])
    # the encoder is random (no weights here): what is tested is SetFit's fit and predict
    # through the baseline, on the prompts it was fitted on
    assert single.predict(["the proxy drops packets", "slow windows host"]) == [["proxy"], ["windows"]]
    texts = {"proxy drops packets": ["proxy"], "slow windows host": ["windows"], "agent restarts crash": ["agent"]}
    texts["agent restarts crash proxy drops packets"] = ["agent", "proxy"]
    multi = SetfitBaseline(str(tiny_encoder), iterations=5).fit(
        [*texts] * 4, [*texts.values()] * 4, ["agent", "proxy", "windows"]
    )
    answers = multi.predict(["agent restarts crash proxy drops packets", "slow windows host"])
    assert sorted(answers[0]) == ["agent", "proxy"] and answers[1] == ["windows"]
    assert list(tmp_path.iterdir()) == []


def test_eval_compares_with_setfit_when_given_an_encoder(tmp_path, tiny_model_dir, tiny_encoder, capsys, monkeypatch):
    import json

    from conftest import chat_example, write_jsonl

    from gpt_finetune.cli.main import main
    from gpt_finetune.eval.baseline import SetfitBaseline

    pairs: list[int] = []  # what --setfit-pairs reached SetFit with (the real fit runs)
    real_fit = SetfitBaseline.fit
    monkeypatch.setattr(SetfitBaseline, "fit", lambda self, *a: (pairs.append(self.iterations), real_fit(self, *a))[1])

    answers = ["'proxy'", "'ovs'", "'windows'"]
    train = write_jsonl(tmp_path / "train.jsonl", [chat_example(i, answers[i % 3]) for i in range(12)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat_example(i, answers[i % 3]) for i in range(12, 18)])
    args = ["eval", "--backend", "local", "-m", str(tiny_model_dir), "-d", str(valid), "--train", str(train)]
    args += ["--mode", "free", "--max-tokens", "2"]
    assert main([*args, "--baseline", "both", "--encoder", str(tiny_encoder), "--setfit-pairs", "3", "--json"]) == 0
    assert pairs == [3]
    results = json.loads(capsys.readouterr().out)["results"]
    assert {"tfidf+logreg", "ngrams+svm", "setfit"} <= set(results)
    best = max(("tfidf+logreg", "ngrams+svm", "setfit"), key=lambda n: results[n]["macro_f1"])
    assert results[str(tiny_model_dir)]["baseline"] == best
    assert main([*args, "--baseline", "setfit"]) != 0  # without an encoder: one clear error
    assert "--baseline setfit needs --encoder" in capsys.readouterr().err
    assert main([*args, "--baseline", "setfit", "--encoder", str(tiny_encoder), "--setfit-pairs", "0"]) == 1
    assert "--setfit-pairs '0': must be at least 1" in capsys.readouterr().err


# ---- label-constrained prediction on a tiny model ---------------------------------------------
MSGS = [{"role": "system", "content": "Label it."}, {"role": "user", "content": "title: the proxy drops packets"}]
CHOICES = ["'bug'", "'feature'", "'question'", "'bug','feature'"]


def separate_scores(model_dir, messages, choices):
    """Each choice on its own: the full sequence through the model, log-probabilities summed over
    the positions the training loss covers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_finetune.local.chat_data import IGNORE, tokenize_example

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for c in choices:
        row = tokenize_example(tok, [*messages, {"role": "assistant", "content": c}])
        ids = torch.tensor([row["input_ids"]])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        out.append(sum(float(logp[k - 1, t]) for k, t in enumerate(row["labels"]) if t != IGNORE))
    return out


def test_constrained_choice_is_the_argmax_of_separately_computed_scores(tmp_path, tiny_model_dir):
    pytest.importorskip("torch")
    from gpt_finetune.home import Home
    from gpt_finetune.local.inference import ChoiceEnd, Engine, GenRequest

    engine = Engine(Home(tmp_path / "home"))
    for k in range(3):
        msgs = [MSGS[0], {"role": "user", "content": f"title: issue {k} about the proxy"}]
        end = next(
            e
            for e in engine.run(GenRequest(str(tiny_model_dir), None, msgs, choices=CHOICES))
            if isinstance(e, ChoiceEnd)
        )
        expected = separate_scores(tiny_model_dir, msgs, CHOICES)
        assert end.scores == pytest.approx(expected, abs=1e-3)
        assert end.text in CHOICES and end.text == CHOICES[max(range(4), key=lambda i: expected[i])]


def test_guided_choice_through_the_chat_service(tmp_path, tiny_model_dir):
    pytest.importorskip("torch")
    from gpt_finetune.errors import BackendError
    from gpt_finetune.services import Services

    services = Services.open(tmp_path / "home")
    req = {"model": str(tiny_model_dir), "messages": MSGS, "guided_choice": CHOICES}
    answer = services.chat.create(req)
    assert answer["choices"][0]["message"]["content"] in CHOICES
    assert answer["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(BackendError) as err:
        services.chat.create({**req, "n": 2})
    assert err.value.param == "n"


def test_a_constrained_answer_carries_its_confidence_among_the_candidates(tmp_path, tiny_model_dir):
    """logprobs of a constrained answer: each candidate's share of the probability the model
    gives the candidates together, from the same scores as computed one by one; they sum to one."""
    pytest.importorskip("torch")
    import math

    from gpt_finetune.services import Services

    services = Services.open(tmp_path / "home")
    req = {
        "model": str(tiny_model_dir),
        "messages": MSGS,
        "structured_outputs": {"choice": CHOICES},
        "logprobs": True,
        "top_logprobs": len(CHOICES),
    }
    answer = services.chat.create(req)["choices"][0]
    (entry,) = answer["logprobs"]["content"]
    expected = separate_scores(tiny_model_dir, MSGS, CHOICES)
    total = math.log(sum(math.exp(s) for s in expected))
    by_choice = {t["token"]: t["logprob"] for t in entry["top_logprobs"]}
    assert set(by_choice) == set(CHOICES)
    for choice, score in zip(CHOICES, expected, strict=True):
        assert by_choice[choice] == pytest.approx(score - total, abs=1e-3)
    assert sum(math.exp(v) for v in by_choice.values()) == pytest.approx(1.0, abs=1e-6)
    assert entry["token"] == answer["message"]["content"] and entry["logprob"] == max(by_choice.values())
    assert [t["logprob"] for t in entry["top_logprobs"]] == sorted(by_choice.values(), reverse=True)


def test_calibration_by_hand():
    from gpt_finetune.eval.metrics import calibration

    cal = calibration([True, True, False, True], [0.95, 0.85, 0.85, 0.35], bins=10, thresholds=(0.8, 0.9))
    # bins: [0.3, 0.4): acc 1, conf 0.35; [0.8, 0.9): acc 0.5, conf 0.85; [0.9, 1.0]: acc 1, conf 0.95
    assert cal["ece"] == pytest.approx(0.25 * 0.65 + 0.5 * 0.35 + 0.25 * 0.05)
    assert [b["n"] for b in cal["bins"]] == [1, 2, 1]
    assert cal["at_threshold"] == [
        {"threshold": 0.8, "coverage": 0.75, "accuracy": pytest.approx(2 / 3)},
        {"threshold": 0.9, "coverage": 0.25, "accuracy": 1.0},
    ]


def test_eval_command_reports_models_and_the_baseline(tmp_path, tiny_model_dir, capsys):
    import json

    from conftest import chat_example, write_jsonl

    from gpt_finetune.cli.main import main

    answers = ["'proxy'", "'ovs'", "'proxy','windows'"]
    train = write_jsonl(tmp_path / "train.jsonl", [chat_example(i, answers[i % 3]) for i in range(12)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat_example(i, answers[i % 3]) for i in range(12, 18)])
    (tmp_path / "valid.labels.json").write_text(
        json.dumps({"labels": ["ovs", "proxy", "windows"], "label_format": "seed"})
    )
    report = tmp_path / "report"
    args = ["eval", "--backend", "local", "-m", str(tiny_model_dir), "-d", str(valid), "--train", str(train)]
    assert main([*args, "--report", str(report), "--json", "--max-tokens", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    results = out["results"]
    assert out["task"] == "classification"
    assert set(results) == {f"{tiny_model_dir} (free)", f"{tiny_model_dir} (constrained)", "tfidf+logreg"}
    constrained = results[f"{tiny_model_dir} (constrained)"]
    assert constrained["out_of_set_rate"] == 0.0  # constrained answers are always known label sets
    assert constrained["multi_label"] and "samples_jaccard" in constrained
    assert len(constrained["vs_baseline"]) == 3
    assert 0 <= constrained["calibration"]["ece"] <= 1 and "calibration" not in results[f"{tiny_model_dir} (free)"]
    assert sum(b["n"] for b in constrained["calibration"]["bins"]) == constrained["n"]
    assert (report / "reliability.png").stat().st_size > 1000
    md = (report / "report.md").read_text()
    assert f"{results['tfidf+logreg']['macro_f1']:.3f}" in md and f"{constrained['macro_f1']:.3f}" in md
    assert (report / "per_label_f1.png").stat().st_size > 1000
    assert main([*args[:-2], "--baseline", "none", "--mode", "constrained"]) == 0  # the table
    table = capsys.readouterr().out
    assert "macro-F1" in table and "per-label F1" in table and "windows" in table


def test_a_classification_job_records_its_label_sets_when_its_files_are_checked(tmp_path, tiny_model_dir):
    pytest.importorskip("torch")
    from conftest import chat_example, toy_examples, write_jsonl

    from gpt_finetune.data.labels import label_sets
    from gpt_finetune.services import Services

    services = Services.open(tmp_path / "home")
    answers = ["'proxy'", "'ovs'", "'proxy','windows'"]
    labelled = write_jsonl(tmp_path / "train.jsonl", [chat_example(i, answers[i % 3]) for i in range(12)])
    qa = [
        {**r, "messages": [*r["messages"][:2], {"role": "assistant", "content": f"Answer {i}, in words."}]}
        for i, r in enumerate(toy_examples(12))
    ]
    free = write_jsonl(tmp_path / "free.jsonl", qa)
    jobs = [
        services.jobs.create(
            model=str(tiny_model_dir), training_file=services.files.create_from_path(p)["id"], start=False
        )["id"]
        for p in (labelled, free)
    ]
    services.jobs.validate_pending(0)
    recorded = services.jobs.spec(jobs[0]).labels
    assert recorded is not None
    assert recorded.to_json() == {"labels": ["ovs", "proxy", "windows"], "label_format": "seed", "label_sets": answers}
    # free answers (each its own) are not labels, although "comma" would read them as such
    assert services.jobs.spec(jobs[1]).labels is None
    assert services.jobs.row(jobs[1])["status"] == "queued"
    assert label_sets(["red", "blue", "red", "blue"]) == {
        "labels": ["blue", "red"],
        "label_format": "comma",
        "label_sets": ["red", "blue"],
    }


def test_a_classification_job_trains_with_the_classification_defaults_unless_told_otherwise(tmp_path, tiny_model_dir):
    pytest.importorskip("torch")
    from conftest import chat_example, toy_examples, write_jsonl

    from gpt_finetune import contract
    from gpt_finetune.contract import LocalOptions
    from gpt_finetune.services import Services

    CLASSIFICATION_DEFAULTS = contract.CLASSIFICATION_DEFAULTS  # the shipped table, as jobs apply it
    assert CLASSIFICATION_DEFAULTS and all(v != LocalOptions().value(k) for k, v in CLASSIFICATION_DEFAULTS.items())

    services = Services.open(tmp_path / "home")
    answers = ["'proxy'", "'ovs'", "'proxy','windows'"]
    labelled = services.files.create_from_path(
        write_jsonl(tmp_path / "train.jsonl", [chat_example(i, answers[i % 3]) for i in range(40)])
    )["id"]
    qa = [
        {**r, "messages": [*r["messages"][:2], {"role": "assistant", "content": f"Answer {i}, in words."}]}
        for i, r in enumerate(toy_examples(40))
    ]
    free = services.files.create_from_path(write_jsonl(tmp_path / "free.jsonl", qa))["id"]
    default = services.jobs.create(model=str(tiny_model_dir), training_file=labelled, start=False)["id"]
    told = services.jobs.create(
        model=str(tiny_model_dir),
        training_file=labelled,
        options={"lora_r": 4},
        hyperparameters={"n_epochs": 2},
        start=False,
    )["id"]
    answering = services.jobs.create(model=str(tiny_model_dir), training_file=free, start=False)["id"]
    services.jobs.validate_pending(0)
    local = {j: services.jobs.spec(j).local for j in (default, told, answering)}
    for key, value in CLASSIFICATION_DEFAULTS.items():
        assert local[default].value(key) == value
        assert local[answering].value(key) == LocalOptions().value(key)  # answering keeps its own
    assert local[told].value("lora_r") == 4  # what the caller set wins, the rest are the classification's
    assert local[told].value("lora_target_modules") == CLASSIFICATION_DEFAULTS["lora_target_modules"]
    # epochs: OpenAI's rule aimed at 5 for classification, at 3 for answering (40 examples: both
    # see at least 100), and what the caller set wins
    epochs = {j: services.jobs.spec(j).hyperparameters.n_epochs for j in (default, told, answering)}
    assert epochs == {default: 5, told: 2, answering: 3}
    assert contract.CLASSIFICATION_EPOCHS == 5
    stated = [e["message"] for e in services.jobs.list_events(default, limit=50)[0]]
    assert any(
        m.startswith("Classification data (3 labels): training with the classification defaults")
        and "n_epochs = 5" in m
        for m in stated
    )
    told_said = [e["message"] for e in services.jobs.list_events(told, limit=50)[0]]
    assert not any("n_epochs" in m for m in told_said)
    assert not any("classification defaults" in e["message"] for e in services.jobs.list_events(answering, limit=50)[0])


def test_the_task_is_found_from_a_label_file_or_from_answers_that_are_labels(tmp_path):
    import json

    from conftest import chat_example, write_jsonl

    from gpt_finetune.eval.evaluate import read_examples

    labels = write_jsonl(tmp_path / "l.jsonl", [chat_example(i, ["'bug'", "'feature'"][i % 2]) for i in range(8)])
    ex = read_examples(labels)
    assert (ex.task, ex.task_from, ex.labels, ex.label_format) == (
        "classification",
        "answers",
        ["bug", "feature"],
        "seed",
    )
    sentences = write_jsonl(tmp_path / "s.jsonl", [chat_example(i, f"It is about thing {i}.") for i in range(8)])
    assert (read_examples(sentences).task, read_examples(sentences).task_from) == ("answering", "default")
    assert read_examples(labels, task="answering").task == "answering"  # --task wins
    (tmp_path / "s.labels.json").write_text(json.dumps({"labels": ["x"], "label_format": "seed"}))
    assert read_examples(sentences, task="answering").task_from == "given"
    assert read_examples(labels, labels_file=str(tmp_path / "s.labels.json")).task_from == "labels"


def test_label_by_label_answers_follow_a_direct_computation_from_the_logits(tmp_path, tiny_model_dir):
    """choose_labels: the best single label, then one more label while that makes a more likely
    complete answer; every score equal to the full sequence scored on its own."""
    pytest.importorskip("torch")
    from gpt_finetune.data.labels import format_labels, parse_labels
    from gpt_finetune.services import Services

    labels = ["bug", "feature", "question", "windows"]
    chosen: list[str] = []
    current = float("-inf")
    while len(chosen) < len(labels):  # the rule, computed by hand from separate full sequences
        rest = [x for x in labels if x not in chosen]
        scores = separate_scores(tiny_model_dir, MSGS, [format_labels([*chosen, x], "seed") for x in rest])
        best = max(range(len(rest)), key=lambda i: scores[i])
        if chosen and scores[best] <= current:
            break
        chosen.append(rest[best])
        current = scores[best]
    services = Services.open(tmp_path / "home")
    req = {"model": str(tiny_model_dir), "messages": MSGS, "label_choice": {"labels": labels, "label_format": "seed"}}
    answer = services.chat.create(req)["choices"][0]
    assert answer["message"]["content"] == format_labels(chosen, "seed") and answer["finish_reason"] == "stop"
    json_answer = services.chat.create({**req, "label_choice": {"labels": labels, "label_format": "json"}})
    assert json_answer["choices"][0]["message"]["content"].startswith('["')

    # probabilities: over every complete answer the search scored, each label's the summed share
    # of the answers that hold it
    import math

    scored: dict[tuple[str, ...], float] = {}
    path: list[str] = []
    for _ in range(len(chosen) + (len(chosen) < len(labels))):
        rest = [x for x in labels if x not in path]
        for x, score in zip(
            rest, separate_scores(tiny_model_dir, MSGS, [format_labels([*path, x], "seed") for x in rest])
        ):
            scored[(*path, x)] = score
        if len(path) < len(chosen):
            path.append(chosen[len(path)])
    total = sum(math.exp(v) for v in scored.values())
    probs = {x: sum(math.exp(v) for k, v in scored.items() if x in k) / total for x in labels}
    with_logprobs = services.chat.create({**req, "logprobs": True, "top_logprobs": 4})["choices"][0]["logprobs"]
    top = with_logprobs["content"][0]
    assert top["token"] == format_labels(chosen, "seed")
    assert math.exp(top["logprob"]) == pytest.approx(math.exp(scored[tuple(chosen)]) / total, rel=1e-3)
    assert {t["token"]: math.exp(t["logprob"]) for t in top["top_logprobs"]} == pytest.approx(probs, rel=1e-3)

    # thresholds: every label at 0, or only the most likely one when none reaches 1.1 ... 1.0
    everything = {**req, "label_choice": {**req["label_choice"], "thresholds": dict.fromkeys(labels, 0.0)}}
    answer_all = services.chat.create(everything)["choices"][0]["message"]["content"]
    assert sorted(parse_labels(answer_all)) == sorted(labels)
    assert parse_labels(answer_all) == sorted(labels, key=lambda x: -probs[x])  # most likely first
    nothing = {**req, "label_choice": {**req["label_choice"], "thresholds": dict.fromkeys(labels, 1.0)}}
    assert parse_labels(services.chat.create(nothing)["choices"][0]["message"]["content"]) == [
        max(labels, key=lambda x: probs[x])
    ]


def test_eval_label_by_label_on_multi_label_data(tmp_path, tiny_model_dir, capsys):
    import json

    from conftest import chat_example, write_jsonl

    from gpt_finetune.cli.main import main

    answers = ["'proxy'", "'ovs'", "'proxy','windows'"]
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat_example(i, answers[i % 3]) for i in range(6)])
    (tmp_path / "valid.labels.json").write_text(json.dumps({"labels": ["ovs", "proxy", "windows"]}))
    args = ["eval", "--backend", "local", "-m", str(tiny_model_dir), "-d", str(valid), "--baseline", "none"]
    assert main([*args, "--mode", "all", "--json", "--max-tokens", "4"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert set(results) == {f"{tiny_model_dir} ({k})" for k in ("free", "constrained", "labels")}
    assert results[f"{tiny_model_dir} (labels)"]["out_of_set_rate"] == 0.0  # every answer is labels of the set


def infer_labels_args(model_dir, labels, question="title: it crashes"):
    """``infer`` on the local backend, label-constrained to the labels of a label file."""
    return ["infer", "--backend", "local", "-m", str(model_dir), "-q", question, "--labels", str(labels)]


def test_thresholds_are_tuned_on_the_validation_file_only_and_infer_uses_them(tmp_path, tiny_model_dir, capsys):
    import json

    from conftest import chat_example, write_jsonl

    from gpt_finetune.cli.main import main

    answers = ["'proxy'", "'ovs'", "'proxy','windows'"]
    tune = write_jsonl(tmp_path / "tune.jsonl", [chat_example(i, answers[i % 3]) for i in range(6)])
    first = write_jsonl(tmp_path / "a.jsonl", [chat_example(i, answers[i % 3]) for i in range(6, 10)])
    second = write_jsonl(tmp_path / "b.jsonl", [chat_example(i, answers[(i + 1) % 3]) for i in range(10, 16)])
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": ["ovs", "proxy", "windows"], "label_format": "seed"}))
    args = ["eval", "--backend", "local", "-m", str(tiny_model_dir), "--labels", str(labels), "--baseline", "none"]
    tuned = f"{tiny_model_dir} (labels, tuned thresholds)"
    found = []
    for data in (first, second):
        report = tmp_path / f"report-{data.stem}"
        assert (
            main([*args, "-d", str(data), "--tune-on", str(tune), "--mode", "free", "--json", "--report", str(report)])
            == 0
        )
        printed = json.loads(capsys.readouterr().out)
        results = printed["results"]
        # every answer is in the JSON too, as labels
        assert {len(p) for p in printed["predictions"].values()} == {sum(1 for _ in open(data))}
        # --tune-on adds label by label to the modes asked
        assert set(results) == {f"{tiny_model_dir} (free)", f"{tiny_model_dir} (labels)", tuned}
        assert results[tuned]["tuned_on"] == str(tune)
        written = json.loads((report / "thresholds.json").read_text())
        assert written["thresholds"] == results[tuned]["thresholds"] and written["model"] == str(tiny_model_dir)
        found.append(results[tuned]["thresholds"])
    assert found[0] == found[1]  # the scored data changed; the thresholds, tuned on the same file, did not
    assert main([*args, "-d", str(tune), "--tune-on", str(tune)]) != 0  # tuning on the scored data is refused
    assert "--tune-on is the --data file" in capsys.readouterr().err

    # infer with those thresholds: the per-label probabilities it shows decide the answer
    infer = infer_labels_args(tiny_model_dir, labels)
    cuts = tmp_path / "report-a" / "thresholds.json"
    assert main([*infer, "--each-label", "--confidence", "--thresholds", str(cuts)]) == 0
    captured = capsys.readouterr()
    shown = [line.split(None, 1)[1] for line in captured.err.splitlines() if line.strip()[:1].isdigit()]
    assert shown[0] == "(this answer)" and sorted(shown[1:]) == ["ovs", "proxy", "windows"]
    # the exact probabilities, from the same engine through the chat service
    import math

    from gpt_finetune.services import Services

    request = {
        "model": str(tiny_model_dir),
        "messages": [{"role": "user", "content": "title: it crashes"}],
        "label_choice": {"labels": ["ovs", "proxy", "windows"], "label_format": "seed"},
        "logprobs": True,
        "top_logprobs": 3,
    }
    top = Services.open(tmp_path / "h").chat.create(request)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    probs = {t["token"]: math.exp(t["logprob"]) for t in top}
    expected = [x for x in probs if probs[x] >= found[0][x]] or [max(probs, key=probs.__getitem__)]
    assert sorted(x.strip("'") for x in captured.out.strip().split(",")) == sorted(expected)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 0.5}))
    assert main([*infer, "--each-label", "--thresholds", str(bad)]) != 0
    assert "'nope' is not one of the --labels" in capsys.readouterr().err


def test_infer_shows_the_confidence_of_each_label_and_answers_label_by_label(tmp_path, tiny_model_dir, capsys):
    import json

    from gpt_finetune.cli.main import main

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": ["bug", "feature", "question"], "label_format": "seed"}))
    base = infer_labels_args(tiny_model_dir, labels)
    assert main([*base, "--confidence"]) == 0
    captured = capsys.readouterr()
    answer = captured.out.strip()
    shown = [line.split() for line in captured.err.splitlines() if line.strip()[:1].isdigit()]
    assert sorted(label for _, label in shown) == ["'bug'", "'feature'", "'question'"]
    assert sum(float(p) for p, _ in shown) == pytest.approx(1.0, abs=0.005)  # printed to 3 decimals
    assert shown[0][1] == answer  # the most likely first, and it is the answer
    assert main([*base, "--each-label"]) == 0
    each = capsys.readouterr().out.strip()
    assert each and all(x.strip("'") in ("bug", "feature", "question") for x in each.split(","))


def test_eval_with_both_baselines_compares_with_the_better(tmp_path, tiny_model_dir, capsys):
    import json

    from conftest import chat_example, write_jsonl

    from gpt_finetune.cli.main import main

    answers = ["'proxy'", "'ovs'", "'windows'"]
    train = write_jsonl(tmp_path / "train.jsonl", [chat_example(i, answers[i % 3]) for i in range(12)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat_example(i, answers[i % 3]) for i in range(12, 18)])
    args = ["eval", "--backend", "local", "-m", str(tiny_model_dir), "-d", str(valid), "--train", str(train)]
    assert main([*args, "--mode", "free", "--max-tokens", "4", "--baseline", "both", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert {"tfidf+logreg", "ngrams+svm"} <= set(results)
    better = max(("tfidf+logreg", "ngrams+svm"), key=lambda n: results[n]["macro_f1"])
    assert results[str(tiny_model_dir)]["baseline"] == better
