"""The chat service and the engine thread: OpenAI's shapes, decoding equal to transformers',
log-probabilities, stop strings, seeds, a bounded queue, cancellation, and several adapters served
at once each answering as it would alone."""

from __future__ import annotations

import threading

import pytest

from gpt_finetune.errors import BackendError
from gpt_finetune.services.chat import parse_request

MSGS = [{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": "thing 1"}]


# ---- request checks (no torch) --------------------------------------------------------------
def test_neutral_values_are_accepted_and_unsupported_ones_refused_by_name():
    ok = parse_request(
        {
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, MSGS[1]],
            "n": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "logit_bias": {},
            "user": "u1",
            "max_completion_tokens": 5,
            "stop": "\n",
        }
    )
    assert ok["messages"][0] == {"role": "system", "content": "be brief"}
    assert ok["max_tokens"] == 5 and ok["stop"] == ["\n"] and ok["n"] == 1
    cases = [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"messages": []}, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ]
    for extra, param in cases:
        with pytest.raises(BackendError) as err:
            parse_request({"model": "m", "messages": MSGS, **extra})
        assert err.value.param == param and err.value.status == 400, extra


# ---- the engine on a tiny model ------------------------------------------------------------------
@pytest.fixture
def engine(tmp_path):
    pytest.importorskip("torch")
    from gpt_finetune.home import Home
    from gpt_finetune.local.inference import Engine

    return Engine(Home(tmp_path / "home"), max_queue=4)


def _adapter(tiny_model_dir, out, seed):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return str(out)


def test_greedy_decoding_equals_transformers_generate(engine, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    end = engine.complete(str(tiny_model_dir), None, MSGS, max_tokens=10, temperature=0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tok.apply_chat_template(MSGS, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id)
    expected = out[0, ids["input_ids"].shape[1] :].tolist()
    if expected and expected[-1] == tok.eos_token_id:
        expected = expected[:-1]
    assert end.token_ids == expected and len(expected) > 0
    assert end.text == tok.decode(expected, skip_special_tokens=True)


def test_logprobs_are_the_models_own(engine, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_finetune.local.inference import GenRequest, Token

    handle = engine.submit(
        GenRequest(str(tiny_model_dir), None, MSGS, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    )
    tokens = [e for e in handle.events() if isinstance(e, Token) and e.token_id >= 0]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tok.apply_chat_template(MSGS, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = torch.cat([prompt["input_ids"][0], torch.tensor([t.token_id for t in tokens])])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
    n = prompt["input_ids"].shape[1]
    for k, t in enumerate(tokens):
        assert t.logprob["logprob"] == pytest.approx(float(logp[n - 1 + k, t.token_id]), abs=1e-4)
        top = t.logprob["top_logprobs"]
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert top[0]["logprob"] == pytest.approx(t.logprob["logprob"], abs=1e-4)  # greedy takes the top


def test_stop_strings_seeds_and_several_choices(engine, tiny_model_dir):
    from gpt_finetune.local.inference import ChoiceEnd, GenRequest, Token

    whole = engine.complete(str(tiny_model_dir), None, MSGS, max_tokens=12, temperature=0).text
    stop = whole[3:5]
    assert len(stop) == 2
    handle = engine.submit(GenRequest(str(tiny_model_dir), None, MSGS, max_tokens=12, temperature=0, stop=[stop]))
    events = list(handle.events())
    end = next(e for e in events if isinstance(e, ChoiceEnd))
    assert end.text == whole[: whole.find(stop)] and end.finish_reason == "stop"
    assert "".join(e.text for e in events if isinstance(e, Token)) == end.text  # streamed text == whole

    def sample(seed):
        ends = engine.run(GenRequest(str(tiny_model_dir), None, MSGS, max_tokens=8, temperature=1.0, seed=seed, n=2))
        return [e.token_ids for e in ends if isinstance(e, ChoiceEnd)]

    a, b = sample(5), sample(5)
    assert a == b and len(a) == 2 and a[0] != a[1]  # same seed, same choices; two choices differ
    assert sample(6) != a


def test_a_full_queue_refuses_at_once_and_a_cancelled_request_frees_the_engine(engine, tiny_model_dir, monkeypatch):
    from gpt_finetune.local.inference import EngineBusy, GenRequest, Token

    gate = threading.Event()
    real = engine._start

    def held(handle):
        gate.wait(30)
        return real(handle)

    monkeypatch.setattr(engine, "_start", held)
    req = GenRequest(str(tiny_model_dir), None, MSGS, max_tokens=400, temperature=1.0, seed=1)
    first = engine.submit(req)  # taken by the engine thread, held at the gate
    for _ in range(100):
        if engine.pending() == 0:
            break
        threading.Event().wait(0.05)
    waiting = [engine.submit(req) for _ in range(4)]  # fills the queue of 4
    with pytest.raises(EngineBusy) as err:
        engine.submit(req)
    assert err.value.status == 429
    for h in waiting:
        h.cancel()  # their callers left: skipped without generating
    gate.set()
    it = first.events()
    next(e for e in it if isinstance(e, Token))
    first.cancel()  # a client that disconnects mid-stream
    rest = list(it)
    assert sum(len(e.token_ids) for e in rest if hasattr(e, "token_ids")) < 400
    monkeypatch.setattr(engine, "_start", real)
    assert engine.complete(str(tiny_model_dir), None, MSGS, max_tokens=3, temperature=0).token_ids


def test_concurrent_requests_for_several_adapters_get_their_own_answers(tiny_model_dir, tmp_path):
    from gpt_finetune.home import Home
    from gpt_finetune.local.inference import Engine

    engine = Engine(Home(tmp_path / "home"), max_queue=64)
    adapters = [None] + [_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=i) for i in range(3)]
    prompts = [[*MSGS[:1], {"role": "user", "content": f"thing {k}"}] for k in range(3)]
    alone = {}
    for a in adapters:  # each request alone, on a fresh engine per adapter
        fresh = Engine(Home(tmp_path / "h2"))
        for k, p in enumerate(prompts):
            alone[a, k] = fresh.complete(str(tiny_model_dir), a, p, max_tokens=8, temperature=0).token_ids
    assert len({tuple(v) for v in alone.values()}) > len(prompts)  # the adapters change the answers
    got: dict = {}

    def ask(a, k):
        got.setdefault((a, k), []).append(
            engine.complete(str(tiny_model_dir), a, prompts[k], max_tokens=8, temperature=0).token_ids
        )

    threads = [threading.Thread(target=ask, args=(a, k)) for _ in range(2) for a in adapters for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {key: [ids, ids] for key, ids in alone.items()}


def test_an_adapter_saved_again_under_its_path_is_never_served_stale(engine, tiny_model_dir, tmp_path):
    import shutil

    path = _adapter(tiny_model_dir, tmp_path / "ckpt", seed=1)
    first = engine.complete(str(tiny_model_dir), path, MSGS, max_tokens=8, temperature=0).token_ids
    shutil.rmtree(path)
    _adapter(tiny_model_dir, tmp_path / "ckpt", seed=2)  # same directory, new weights (a resumed job)
    second = engine.complete(str(tiny_model_dir), path, MSGS, max_tokens=8, temperature=0).token_ids
    from gpt_finetune.home import Home
    from gpt_finetune.local.inference import Engine

    assert (
        second
        == Engine(Home(tmp_path / "h3"))
        .complete(str(tiny_model_dir), path, MSGS, max_tokens=8, temperature=0)
        .token_ids
    )
    assert first != second


def test_chat_service_returns_openai_shapes(tmp_path, tiny_model_dir):
    pytest.importorskip("torch")
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from gpt_finetune.services import Services

    services = Services.open(tmp_path / "home")
    req = {"model": str(tiny_model_dir), "messages": MSGS, "max_tokens": 6, "temperature": 0, "logprobs": True}
    whole = ChatCompletion.model_validate(services.chat.create(req), strict=True)
    assert whole.usage.completion_tokens == len(whole.choices[0].logprobs.content) > 0
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = [
        ChatCompletionChunk.model_validate(c)
        for c in services.chat.create({**req, "stream": True, "stream_options": {"include_usage": True}})
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_create_many_batches_greedy_requests_and_keeps_each_answer_or_error_in_place(tmp_path, tiny_model_dir):
    from gpt_finetune.errors import GptFinetuneError
    from gpt_finetune.services import Services

    services = Services.open(tmp_path / "home")
    req = lambda k, **kw: {  # noqa: E731
        "model": str(tiny_model_dir),
        "messages": [MSGS[0], {"role": "user", "content": f"thing {k}"}],
        "max_tokens": 6,
        "temperature": 0,
        **kw,
    }
    requests = [
        req(0),
        req(1, temperature=1.0, seed=3),
        req(2, presence_penalty=2),
        req(3),
        {**req(4), "model": "nope"},
    ]
    out = services.chat.create_many(requests, batch_size=2)
    assert len(out) == 5
    for k in (0, 1, 3):
        alone = services.chat.create(requests[k])
        assert out[k]["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
        assert out[k]["usage"] == alone["usage"]
    assert isinstance(out[2], GptFinetuneError) and out[2].param == "presence_penalty"
    assert isinstance(out[4], GptFinetuneError) and out[4].status == 404


def test_structured_outputs_choice_is_guided_choice_under_its_current_name():
    msgs = [{"role": "user", "content": "x"}]
    old = parse_request({"model": "m", "messages": msgs, "guided_choice": ["a", "b"]})
    new = parse_request({"model": "m", "messages": msgs, "structured_outputs": {"choice": ["a", "b"]}})
    assert old == new and new["choices"] == ["a", "b"]
    both = {"model": "m", "messages": msgs, "guided_choice": ["a", "b"], "structured_outputs": {"choice": ["a", "b"]}}
    assert parse_request(both)["choices"] == ["a", "b"]  # the same list twice is one constraint
    for body, param in [
        ({"structured_outputs": {"choice": ["a"]}, "guided_choice": ["b"]}, "guided_choice"),
        ({"structured_outputs": {"json": {}}}, "structured_outputs.json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": ["a"]}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"]}, "n": 2}, "n"),
    ]:
        with pytest.raises(BackendError) as exc:
            parse_request({"model": "m", "messages": msgs, **body})
        assert exc.value.param == param


def test_label_choice_is_checked_field_by_field():
    from gpt_finetune.contract import LabelChoice

    msgs = [{"role": "user", "content": "x"}]
    ok = parse_request({"model": "m", "messages": msgs, "label_choice": {"labels": ["a", "b"], "label_format": "json"}})
    assert ok["label_choice"] == LabelChoice(("a", "b"), "json") and ok["choices"] is None
    assert parse_request({"model": "m", "messages": msgs, "label_choice": {"labels": ["a"]}})["label_choice"] == (
        LabelChoice(("a",), "seed")
    )
    cut = {"labels": ["a", "b"], "thresholds": {"b": 0.25}}
    with_cut = parse_request({"model": "m", "messages": msgs, "label_choice": cut, "logprobs": True})
    assert with_cut["label_choice"].thresholds == {"b": 0.25} and with_cut["logprobs"]  # logprobs: the labels'
    for extra, param in [
        ({"label_choice": {"labels": ["a", "a"]}}, "label_choice.labels"),
        ({"label_choice": {"labels": []}}, "label_choice.labels"),
        ({"label_choice": {"labels": ["a"], "label_format": "yaml"}}, "label_choice.label_format"),
        ({"label_choice": {"labels": ["a"], "other": 1}}, "label_choice"),
        ({"label_choice": {"labels": ["a"]}, "guided_choice": ["a"]}, "guided_choice"),
        ({"label_choice": {"labels": ["a"], "thresholds": {"c": 0.5}}}, "label_choice.thresholds.c"),
        ({"label_choice": {"labels": ["a"], "thresholds": {"a": 1.5}}}, "label_choice.thresholds.a"),
        ({"label_choice": {"labels": ["a"], "thresholds": {"a": True}}}, "label_choice.thresholds.a"),
        ({"label_choice": {"labels": ["a"], "thresholds": [0.5]}}, "label_choice.thresholds"),
    ]:
        with pytest.raises(BackendError) as exc:
            parse_request({"model": "m", "messages": msgs, **extra})
        assert exc.value.param == param
