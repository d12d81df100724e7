"""Continuous batching in the engine: every request gets, token for token, the answer it gets
alone, whatever runs beside it (other adapters, the base model, longer prompts, requests that
arrive mid-batch, chunked prompts); seeds hold across batches; the KV cache stays within its
budget, a request waits for room and one that can never fit is refused; adapters are evicted
least recently used, and one deleted mid-answer finishes that answer."""

from __future__ import annotations

import shutil
import threading

import pytest

from gpt_finetune.errors import BackendError

SYSTEM = {"role": "system", "content": "Answer with a colour."}


def _prompt(k: int) -> list[dict]:
    # prompts of different lengths, so rows of one batch sit at different positions
    return [SYSTEM, {"role": "user", "content": f"thing {k} " + "long " * (3 * k)}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        path = tmp_path_factory.mktemp("adapters") / f"a{seed}"
        get_peft_model(model, lora).save_pretrained(path)
        out.append(str(path))
    return out


def _engine(tmp_path, name: str, **kw):
    from gpt_finetune.home import Home
    from gpt_finetune.local.inference import Engine

    return Engine(Home(tmp_path / name), max_queue=64, **kw)


def _answer(events) -> tuple[list[int], list[float]]:
    """(token ids, each token's log-probability): the second shows any difference in the
    arithmetic (a wrong mask or position), which a tiny model's greedy tokens may hide."""
    from gpt_finetune.local.inference import ChoiceEnd, Token

    events = list(events)
    ids = next(e.token_ids for e in events if isinstance(e, ChoiceEnd))
    return ids, [e.logprob["logprob"] for e in events if isinstance(e, Token) and e.token_id >= 0]


def _alone(tmp_path, model, jobs, dtype=None):
    """Each (adapter, prompt k) answered greedily by transformers and PEFT directly, one at a
    time with transformers' own cache: the reference the engine's batches must equal."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    tok = AutoTokenizer.from_pretrained(model)
    out = {}
    for a, k in jobs:
        net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype or torch.float32).eval()
        if a is not None:
            net = PeftModel.from_pretrained(net, a).eval()
        ids = tok.apply_chat_template(_prompt(k), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        step, cache, tokens, logps = ids["input_ids"], DynamicCache(config=net.config), [], []
        with torch.inference_mode():
            for _ in range(10):
                logp = torch.log_softmax(net(input_ids=step, cache=cache, use_cache=True).logits[0, -1].float(), -1)
                token = int(torch.argmax(logp))
                if token == tok.eos_token_id:
                    break
                tokens.append(token)
                logps.append(float(logp[token]))
                step = torch.tensor([[token]])
        out[a, k] = (tokens, logps)
    return out


def _same(got, expected) -> bool:
    return got.keys() == expected.keys() and all(
        got[j][0] == expected[j][0] and got[j][1] == pytest.approx(expected[j][1], abs=1e-4) for j in got
    )


def _together(engine, model, jobs, *, late=(), **kw):
    """Every job submitted at once; the ``late`` ones once the first tokens of the others came."""
    from gpt_finetune.local.inference import GenRequest, Token

    def submit(a, k):
        return engine.submit(GenRequest(str(model), a, _prompt(k), max_tokens=10, temperature=0, logprobs=True, **kw))

    handles = {job: submit(*job) for job in jobs if job not in late}
    lead = next(iter(handles))
    first = handles[lead].events()
    seen = [next(e for e in first if isinstance(e, Token))]  # the batch is decoding
    handles.update({job: submit(*job) for job in late})
    return {job: _answer([*seen, *first] if job == lead else h.events()) for job, h in handles.items()}


def test_a_mixed_batch_answers_each_request_as_it_is_answered_alone(tmp_path, tiny_model_dir, adapters):
    jobs = [(a, k) for a in [None, *adapters] for k in range(3)]
    alone = _alone(tmp_path, tiny_model_dir, jobs)
    assert len({tuple(v[0]) for v in alone.values()}) > 3  # the adapters change the answers
    engine = _engine(tmp_path, "batched", max_batch=16)
    late = [(adapters[0], 2), (None, 1)]
    assert _same(_together(engine, tiny_model_dir, jobs, late=late), alone)
    assert engine.peak_batch > 4  # they did run together, not one after another


def test_long_prompts_are_read_in_chunks_and_answer_the_same(tmp_path, tiny_model_dir, adapters, monkeypatch):
    from gpt_finetune.local import batching

    jobs = [(adapters[1], 4), (None, 6), (adapters[2], 0)]
    alone = _alone(tmp_path, tiny_model_dir, jobs)
    monkeypatch.setattr(batching, "PREFILL_CHUNK", 5)  # every prompt here is several chunks
    engine = _engine(tmp_path, "chunked")
    assert _same(_together(engine, tiny_model_dir, jobs, late=[(adapters[2], 0)]), alone)


def test_a_sliding_window_model_falls_back_to_a_cache_per_sequence_and_answers_the_same(tmp_path, smol_tokenizer_dir):
    """A model whose layers are partly sliding-window (Qwen2 with ``use_sliding_window``: the
    first layer full, the second seeing 8 positions) does not fit the slot layout, which keeps
    every position; the engine then keeps one transformers cache per sequence. Every prompt here
    is longer than the window, so a wrong fallback (slots, or a full cache) changes the answers."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    model = tmp_path / "tiny-sliding"
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    Qwen2ForCausalLM(cfg).save_pretrained(model)
    tok.save_pretrained(model)
    jobs = [(None, k) for k in range(4)]
    alone = _alone(tmp_path, model, jobs)
    assert all(len(v[0]) > 2 for v in alone.values())  # answers long enough to leave the window behind
    engine = _engine(tmp_path, "sliding", max_batch=16)
    assert _same(_together(engine, model, jobs, late=[(None, 3)]), alone)
    assert engine.peak_batch > 1  # decoded side by side, each row from its own cache


def test_a_seed_gives_the_same_sample_whatever_is_batched_beside_it(tmp_path, tiny_model_dir, adapters):
    from gpt_finetune.local.inference import ChoiceEnd, GenRequest

    engine = _engine(tmp_path, "seeded")
    request = GenRequest(str(tiny_model_dir), adapters[0], _prompt(1), max_tokens=8, temperature=1.0, seed=11, n=2)
    alone = [e.token_ids for e in engine.run(request) if isinstance(e, ChoiceEnd)]
    others = [
        engine.submit(GenRequest(str(tiny_model_dir), a, _prompt(2), max_tokens=8, temperature=1.0))
        for a in [None, *adapters]
    ]
    beside = [e.token_ids for e in engine.run(request) if isinstance(e, ChoiceEnd)]
    for h in others:
        list(h.events())
    assert beside == alone and alone[0] != alone[1]


def test_the_kv_cache_stays_within_its_budget_and_a_request_waits_for_room(tmp_path, tiny_model_dir):
    from gpt_finetune.local.batching import kv_bytes_per_token
    from gpt_finetune.local.inference import ChoiceEnd, GenRequest

    probe = _engine(tmp_path, "probe")
    first = probe.complete(str(tiny_model_dir), None, _prompt(0), max_tokens=4, temperature=0)
    entry, _ = probe._load(str(tiny_model_dir), None)
    per_token = kv_bytes_per_token(entry[0].config, entry[0].dtype)
    prompt_tokens = probe.run(GenRequest(str(tiny_model_dir), None, _prompt(5), max_tokens=1, temperature=0))[-1]
    longest = prompt_tokens.prompt_tokens + 40
    # room for two of these sequences at a time, not three
    budget = 2.5 * longest * per_token
    engine = _engine(tmp_path, "small", kv_cache_gb=budget / 1e9)
    jobs = [(None, 5)] * 6
    alone = _alone(tmp_path, tiny_model_dir, jobs[:1])
    handles = [
        engine.submit(GenRequest(str(tiny_model_dir), None, _prompt(5), max_tokens=40, temperature=0)) for _ in jobs
    ]
    ends = [next(e for e in h.events() if isinstance(e, ChoiceEnd)) for h in handles]
    assert all(e.token_ids[:10] == alone[None, 5][0] for e in ends)  # every one answered, in turn
    assert engine.peak_batch == 2 and 0 < engine.peak_kv_bytes <= budget
    with pytest.raises(BackendError) as err:  # more than the whole budget: never
        engine.complete(str(tiny_model_dir), None, _prompt(5), max_tokens=400, temperature=0)
    assert err.value.status == 400 and "can never fit" in str(err.value)
    assert first.token_ids  # the probe's own answer came too


def test_adapters_past_the_limit_are_evicted_least_recently_used(tmp_path, tiny_model_dir, adapters):
    jobs = [(a, 0) for a in adapters]
    alone = _alone(tmp_path, tiny_model_dir, jobs)
    engine = _engine(tmp_path, "lru", max_adapters=2)
    for _ in range(2):
        for a in adapters:
            answer = engine.complete(str(tiny_model_dir), a, _prompt(0), max_tokens=10, temperature=0)
            assert answer.token_ids == alone[a, 0][0]
            assert len(engine._bases[str(tiny_model_dir)][2]) <= 2
    entry = engine._bases[str(tiny_model_dir)]
    assert set(entry[2].values()) == set(adapters[1:])  # the first one was the least recently used


def test_an_adapter_deleted_mid_answer_finishes_it_and_then_goes(tmp_path, tiny_model_dir, adapters):
    from gpt_finetune.local.inference import ChoiceEnd, GenRequest, Token

    copy = tmp_path / "doomed"
    shutil.copytree(adapters[2], copy)
    expected = _alone(tmp_path, tiny_model_dir, [(str(copy), 3)])[str(copy), 3][0]
    engine = _engine(tmp_path, "deleted")
    handle = engine.submit(GenRequest(str(tiny_model_dir), str(copy), _prompt(3), max_tokens=10, temperature=0))
    events = handle.events()
    seen = [next(e for e in events if isinstance(e, Token))]
    shutil.rmtree(copy)
    done = threading.Event()

    def other():  # a new request for the same base makes the engine look for gone adapters
        engine.complete(str(tiny_model_dir), None, _prompt(1), max_tokens=10, temperature=0)
        done.set()

    threading.Thread(target=other).start()
    end = next(e for e in [*seen, *events] if isinstance(e, ChoiceEnd))
    assert end.token_ids == expected
    assert done.wait(60)
    engine.complete(str(tiny_model_dir), None, _prompt(1), max_tokens=2, temperature=0)
    assert not engine._bases[str(tiny_model_dir)][2]  # detached once nothing used it


def test_a_failed_batched_step_fails_that_batch_once_and_the_engine_serves_on(tmp_path, tiny_model_dir, monkeypatch):
    from gpt_finetune.local.inference import ChoiceEnd, Engine, Failed, GenRequest, Token

    engine = _engine(tmp_path, "faulty", max_batch=8)
    expected = engine.complete(str(tiny_model_dir), None, _prompt(1), max_tokens=10, temperature=0).token_ids
    real, calls = Engine._forward, {"n": 0, "rows": 0}

    def forward(self, group, adapters, **kw):
        calls["n"] += 1
        if len(adapters) >= 3 and not calls["rows"]:  # the first step that decodes three rows at once
            calls["rows"] = len(adapters)
            raise RuntimeError("injected: a decoding step failed")
        return real(self, group, adapters, **kw)

    monkeypatch.setattr(Engine, "_forward", forward)
    handles = [
        engine.submit(GenRequest(str(tiny_model_dir), None, _prompt(k), max_tokens=30, temperature=0)) for k in range(3)
    ]
    for h in handles:
        events = list(h.events())  # each stream ends, once, with the failure
        assert isinstance(events[-1], Failed) and "injected" in str(events[-1].error)
        assert sum(isinstance(e, Failed) for e in events) == 1 and not any(isinstance(e, ChoiceEnd) for e in events)
        assert all(isinstance(e, Token) for e in events[:-1])
    assert calls["rows"] == 3 and engine.running() == 0 and engine.pending() == 0
    # the next request is served as if nothing had happened
    after = engine.complete(str(tiny_model_dir), None, _prompt(1), max_tokens=10, temperature=0)
    assert after.token_ids == expected


def test_a_sequence_that_fails_to_join_the_batch_fails_its_request_instead_of_hanging(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Between its prefill and its row in the batch a sequence is in none of the batch's lists:
    a failure there (growing the cache, here) must still reach its caller."""
    from gpt_finetune.local import batching
    from gpt_finetune.local.inference import Failed, GenRequest

    engine = _engine(tmp_path, "joining", max_batch=8)
    expected = engine.complete(str(tiny_model_dir), None, _prompt(2), max_tokens=10, temperature=0).token_ids
    real, calls = batching.SlotCache.reserve, {"n": 0}

    def reserve(self, rows, width, like):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: no room for the row")
        return real(self, rows, width, like)

    monkeypatch.setattr(batching.SlotCache, "reserve", reserve)
    handle = engine.submit(GenRequest(str(tiny_model_dir), None, _prompt(1), max_tokens=10, temperature=0))
    events = []
    thread = threading.Thread(target=lambda: events.extend(handle.events()), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the request was lost: its caller still waits"
    assert isinstance(events[-1], Failed) and "injected" in str(events[-1].error)
    assert engine.running() == 0 and engine.pending() == 0
    after = engine.complete(str(tiny_model_dir), None, _prompt(2), max_tokens=10, temperature=0).token_ids
    assert after == expected and calls["n"] > 1


def test_the_dense_mixed_step_equals_peft_s_mixed_batch_and_leaves_other_adapters_to_peft(tiny_model_dir, adapters):
    """local/mixed_lora.py against PEFT's own mixed batch on the same rows (two adapters and the
    base model) and against ``disable_adapter`` for a step all on the base, PEFT's own path
    untouched outside it, and DoRA adapters left to PEFT."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from gpt_finetune.local import mixed_lora

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters[0], "a0")
    model.load_adapter(adapters[1], adapter_name="a1")
    model.eval()
    rows = ["a1", None, "a0", "a1", None]
    ids = torch.randint(0, 1000, (len(rows), 7))
    assert mixed_lora.supported(model)
    with torch.no_grad():
        peft = model(input_ids=ids, adapter_names=[a or "__base__" for a in rows]).logits
        with mixed_lora.mixed_rows(model, rows):
            dense = model(input_ids=ids).logits
        after = model(input_ids=ids).logits  # outside: PEFT's active adapter again, for every row
        with mixed_lora.mixed_rows(model, [None] * len(rows)):  # a step with every row on the base
            base_dense = model(input_ids=ids).logits
        with model.disable_adapter():
            base_peft = model(input_ids=ids).logits
    assert torch.equal(base_dense, base_peft)  # the base layers alone: the same arithmetic
    assert (base_dense - peft).abs().max().item() > 1e-3  # and not what the adapters answer
    assert (dense - peft).abs().max().item() < 1e-5
    assert (after[2] - peft[2]).abs().max().item() < 1e-5  # row 2 is on a0, the active adapter
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, use_dora=True))
    assert not mixed_lora.supported(dora)


def test_bf16_weights_answer_as_transformers_does_in_bf16_with_half_the_cache(tmp_path, tiny_model_dir, adapters):
    """``inference_dtype = bfloat16``: the base in bf16 (the adapters stay float32, as PEFT
    keeps them), the KV cache in bf16 (half the bytes a token), and a mixed batch of the base
    and two adapters answered through the same steps (SlotCache, the bf16 mask, the dense mixed
    matmuls casting between float32 adapters and bf16 layers)."""
    import torch

    from gpt_finetune.local.batching import kv_bytes_per_token

    jobs = [(a, k) for a in [None, *adapters[:2]] for k in range(3)]
    alone = _alone(tmp_path, tiny_model_dir, jobs, dtype=torch.bfloat16)
    one = _engine(tmp_path, "bf16-one", dtype="bfloat16", max_batch=1)
    assert _same(_together(one, tiny_model_dir, jobs), alone)  # one at a time: transformers' own bf16
    many = _engine(tmp_path, "bf16-many", dtype="bfloat16", max_batch=16)
    got = _together(many, tiny_model_dir, jobs, late=[(adapters[0], 2)])
    # together, bf16's rounding of other matrix shapes moves the log-probabilities a little
    # (measured at most 0.004 here; a near tie can flip a token: bench/README.md measures how often)
    assert got.keys() == alone.keys() and all(got[j][0] == alone[j][0] for j in jobs)
    assert all(g == pytest.approx(a, abs=0.02) for j in jobs for g, a in zip(got[j][1], alone[j][1], strict=True))
    assert many.peak_batch > 4
    entry, _ = many._load(str(tiny_model_dir), None)
    assert entry[0].dtype == torch.bfloat16 and many.dtype == "bfloat16"
    # the cache held for one sequence at a time: half the bytes of float32's for the same requests
    fp32 = _engine(tmp_path, "fp32-one", dtype="float32", max_batch=1)
    _together(fp32, tiny_model_dir, jobs)
    assert one.peak_kv_bytes > 0 and one.peak_kv_bytes * 2 == fp32.peak_kv_bytes
    assert kv_bytes_per_token(entry[0].config, entry[0].dtype) * 2 == kv_bytes_per_token(entry[0].config, torch.float32)
    assert all(p.dtype == torch.float32 for n, p in entry[0].named_parameters() if "lora_" in n)
    assert "bfloat16 weights" in many.describe()
