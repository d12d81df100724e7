"""``gpt-finetune models export``: a tiny fine-tuned model (a real local job) exported as a merged
Hugging Face model, as GGUF with an Ollama Modelfile, and as its adapter; each read back by other
code than ours (transformers, the ``gguf`` reader) and compared with what ``infer`` answers."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("gguf")

from conftest import stop_workers, toy_examples, write_jsonl

from gpt_finetune.backends.base import Hyperparameters
from gpt_finetune.backends.local import LocalBackend
from gpt_finetune.cli.main import main
from gpt_finetune.services import Services

PROMPTS = [
    [{"role": "system", "content": "Answer with a colour."}, {"role": "user", "content": f"thing {k}"}]
    for k in range(4)
] + [[{"role": "user", "content": "What colour is the sky over a new export?"}]]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir):
    """(home, the fine-tuned model's id, its checkpoint's id, infer's greedy answers): one real job."""
    home = tmp_path_factory.mktemp("export-home")
    b = LocalBackend(Services.open(home), {"log_every_steps": 1})
    data = write_jsonl(home / "train.jsonl", toy_examples(20))
    job = b.create_job(
        model=str(tiny_model_dir),
        training_file=b.upload_file(data).id,
        hyperparameters=Hyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=10),
        suffix="toy",
        seed=5,
    )
    deadline = time.time() + 300
    while (done := b.retrieve_job(job.id)).status not in ("succeeded", "failed") and time.time() < deadline:
        time.sleep(0.3)
    assert done.status == "succeeded", done.error
    ckpt = b.list_checkpoints(job.id)[-1].fine_tuned_model_checkpoint
    answers = [
        b.chat(model=done.fine_tuned_model, messages=m, max_tokens=8, temperature=0).choices[0].message.content
        for m in PROMPTS
    ]
    yield home, done.fine_tuned_model, ckpt, answers
    stop_workers(home)


def export(home, *args):
    return main(["models", "export", "--backend", "local", "--home", str(home), *map(str, args)])


def greedy(model, tokenizer, messages, n=8):
    import torch

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=model.generation_config.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def last_logits(model, tokenizer, messages):
    import torch

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(ids).logits[0].float()


# a model directory loaded, and answers given, by transformers alone: gpt_finetune is made
# unimportable first, so nothing of this project can take part
PLAIN_TRANSFORMERS = """
import json, sys
sys.modules["gpt_finetune"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
out = []
for messages in prompts:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)  # stops: the generation config's
    out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
print(json.dumps(out))
"""


def test_hf_export_answers_as_infer_with_transformers_alone(tuned, tmp_path, capsys):
    home, model_id, _, answers = tuned
    out = tmp_path / "hf"
    assert export(home, model_id, "-o", out, "--format", "hf") == 0
    assert "vllm serve" in capsys.readouterr().err  # how to run it
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(tmp_path.glob(".hf.*"))  # the temporary directory was renamed, none left
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(out), json.dumps(PROMPTS)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == answers
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert 2 in (stops if isinstance(stops, list) else [stops])  # <|im_end|>: a turn's end stops a reply
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny-llama\n") and model_id in card
    for fact in ("| Method | supervised |", "| Training examples | 20 |", "| Hyperparameter `n_epochs` | 3 |"):
        assert fact in card
    assert "final train_loss" in card  # the job's results
    saved = "".join(p.read_text() for p in out.glob("*") if p.name in ("tokenizer_config.json", "chat_template.jinja"))
    assert "<|im_start|>" in saved  # the chat template travels with the tokenizer


def test_gguf_exports_read_back_by_transformers_f32_identical_others_within_tolerance(tuned, tmp_path, capsys):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_finetune.backends.local import export_source
    from gpt_finetune.base_catalog import gguf_path
    from gpt_finetune.local.export import load_merged

    home, model_id, _, answers = tuned
    merged, tok = load_merged(export_source(Services.open(home), model_id))
    reference = [last_logits(merged, tok, m) for m in PROMPTS[:2]]
    # relative to the largest logit: f16 rounds each weight to 11 bits; q8_0 to 8 bits per block
    tolerance = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 3e-2}
    original = gguf.GGUFReader(str(gguf_path()))
    for dtype, tol in tolerance.items():
        out = tmp_path / dtype
        assert export(home, model_id, "-o", out, "--format", "gguf", "--dtype", dtype) == 0, capsys.readouterr().err
        (file,) = out.glob("*.gguf")
        assert file.name == f"tiny-llama-toy-{model_id.split(':')[-1]}.{dtype}.gguf"
        assert (out / "Modelfile").is_file() and (out / "README.md").is_file()
        reader = gguf.GGUFReader(str(file))
        # the tokenizer's metadata is the default base's GGUF's, as it was
        for key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.pre",
        ):
            assert reader.fields[key].contents() == original.fields[key].contents(), key
        assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=file.name, dtype=torch.float32).eval()
        if dtype == "f32":  # the tokenizer's metadata is the same in every file (checked above): read it once
            gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file=file.name)
        for ref, messages in zip(reference, PROMPTS[:2]):
            got = last_logits(model, gguf_tok, messages)
            assert got.shape == ref.shape
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err <= tol, (dtype, err)
        if dtype == "f32":
            assert [greedy(model, gguf_tok, m) for m in PROMPTS] == answers
        # matrices take the export's type (q8_0 where rows fill its blocks of 32); norms stay f32
        assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2 and t.shape[0] % 32 == 0} == {
            dtype.upper()
        }
        assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}


def test_modelfile_follows_ollama_syntax_and_renders_the_chat_template(tuned, tmp_path):
    from transformers import AutoTokenizer

    home, model_id, _, _ = tuned
    out = tmp_path / "ollama"
    assert export(home, model_id, "-o", out, "--format", "gguf", "--dtype", "f16") == 0
    instructions = parse_modelfile((out / "Modelfile").read_text())
    names = [name for name, _ in instructions]
    assert names[0] == "FROM" and set(names) <= {
        "FROM",
        "TEMPLATE",
        "SYSTEM",
        "PARAMETER",
        "ADAPTER",
        "LICENSE",
        "MESSAGE",
    }
    source = dict(instructions)["FROM"]
    assert (out / source).is_file()  # a path relative to the Modelfile, as `ollama create -f` reads it
    params = [v.split(None, 1) for n, v in instructions if n == "PARAMETER"]
    assert ["stop", '"<|im_end|>"'] in params and ["temperature", "0"] in params
    for name, value in params:
        assert name in OLLAMA_PARAMETERS, name
        OLLAMA_PARAMETERS[name](json.loads(value) if value.startswith('"') else value)
    # the job trained with this system prompt, so Ollama sends it when a request has none
    assert dict(instructions)["SYSTEM"] == "Answer with a colour."
    # the Go template gives exactly the prompt the model was trained on
    tok = AutoTokenizer.from_pretrained(out, gguf_file=source)
    template = dict(instructions)["TEMPLATE"]
    chats = [
        PROMPTS[0],
        [*PROMPTS[1], {"role": "assistant", "content": "blue"}, {"role": "user", "content": "thing 3"}],
    ]
    for messages in chats:
        system = " ".join(m["content"] for m in messages if m["role"] == "system")
        # Ollama hands the template its messages with Go's capitalised field names
        ollama_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]
        rendered = render_go_template(template, {"System": system, "Messages": ollama_messages})
        assert rendered == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_adapter_export_is_peft_files_and_a_lora_gguf_that_rebuilds_the_merged_weights(tuned, tmp_path, tiny_model_dir):
    import gguf
    import numpy as np

    home, model_id, _, _ = tuned
    out = tmp_path / "adapter"
    assert export(home, model_id, "-o", out, "--format", "adapter") == 0
    adapter_dir = Path(Services.open(home).store.get("models", model_id)["path"])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (adapter_dir / name).read_bytes()
    (lora_file,) = out.glob("*.lora-f32.gguf")
    lora = gguf.GGUFReader(str(lora_file))
    assert lora.fields["general.type"].contents() == "adapter"
    assert lora.fields["adapter.type"].contents() == "lora"
    config = json.loads((out / "adapter_config.json").read_text())
    # base and fine-tuned model as f32 GGUF: the fine-tune's weights = base + alpha/r * B A, in GGUF's layout
    assert export(home, tiny_model_dir, "-o", tmp_path / "base", "--format", "gguf", "--dtype", "f32") == 0
    assert export(home, model_id, "-o", tmp_path / "tuned", "--format", "gguf", "--dtype", "f32") == 0
    base = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(next((tmp_path / "base").glob("*.gguf")))).tensors}
    merged = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(next((tmp_path / "tuned").glob("*.gguf")))).tensors}
    pairs = {t.name: np.array(t.data) for t in lora.tensors}
    scale = float(lora.fields["adapter.lora.alpha"].contents()) / config["r"]
    adapted = sorted(name.removesuffix(".lora_a") for name in pairs if name.endswith(".lora_a"))
    assert adapted and any("attn_q" in n for n in adapted) and any("attn_k" in n for n in adapted)
    for name in adapted:
        rebuilt = base[name] + scale * pairs[name + ".lora_b"] @ pairs[name + ".lora_a"]
        np.testing.assert_allclose(rebuilt, merged[name], atol=1e-5, rtol=1e-4)
    unadapted = set(merged) - set(adapted)
    assert unadapted and all(np.array_equal(base[n], merged[n]) for n in unadapted)


def test_checkpoints_export_and_bad_requests_are_refused_with_nothing_clobbered(
    tuned, tmp_path, capsys, tiny_model_dir
):
    home, model_id, ckpt, _ = tuned
    out = tmp_path / "ckpt"
    assert export(home, ckpt, "-o", out, "--format", "hf", "--dtype", "f16") == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # an existing output is kept ...
    assert export(home, model_id, "-o", out, "--format", "gguf") == 1
    assert "already exists; nothing was written" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # ... and replaced only by a complete export
    assert export(home, model_id, "-o", out, "--format", "gguf", "--force") == 0
    assert {p.suffix for p in out.iterdir()} == {".gguf", "", ".md"}  # the hf files are gone
    capsys.readouterr()
    cases = [
        ((tiny_model_dir, "-o", tmp_path / "x", "--format", "adapter"), "has no LoRA adapter to export"),
        ((model_id, "-o", tmp_path / "x", "--format", "hf", "--dtype", "q8_0"), "an hf export is saved in"),
        ((model_id, "-o", tmp_path / "x", "--format", "adapter", "--dtype", "q8_0"), "takes f32, f16, bf16"),
        (("no-such-model", "-o", tmp_path / "x"), "does not exist"),
    ]
    for args, message in cases:
        assert export(home, *args) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_a_gguf_export_of_another_architecture_is_refused_with_the_way_round(tmp_path, capsys, smol_tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    gpt2 = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    assert main(["models", "export", "--backend", "local", str(gpt2), "-o", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err
    assert "GGUF export supports the Llama family" in err and "'gpt2'" in err and "convert_hf_to_gguf.py" in err
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.*"))
    # the hf format takes it (merging needs no architecture knowledge)
    assert main(["models", "export", "--backend", "local", str(gpt2), "-o", str(tmp_path / "h"), "--format", "hf"]) == 0


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), "a file that does not read back"],
    ids=["disk-full", "bad-read-back"],
)
def test_a_failure_while_writing_leaves_no_partial_export(tuned, tmp_path, capsys, monkeypatch, failure):
    import gpt_finetune.local.export as ex

    home, model_id, _, _ = tuned
    out = tmp_path / "old"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def broken(*_a, **_k):
        raise failure if isinstance(failure, OSError) else ex.ExportError(failure)

    monkeypatch.setattr(ex, "verify_gguf", broken)  # the file is written; reading it back fails
    assert export(home, model_id, "-o", out, "--format", "gguf", "--force") == 1
    err = capsys.readouterr().err
    assert ("No space left" if isinstance(failure, OSError) else failure) in err
    assert "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".old.*"))


# ---- Ollama's Modelfile, as its documentation (docs/modelfile.md) defines it ------------------------
OLLAMA_PARAMETERS = {
    "num_ctx": int,
    "repeat_last_n": int,
    "repeat_penalty": float,
    "temperature": float,
    "seed": int,
    "stop": str,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """``INSTRUCTION arguments`` lines; ``#`` comments; values in triple quotes may span lines."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.partition(" ")
        assert name.isupper(), f"not an instruction: {line!r}"
        if value.startswith('"""'):
            body = value[3:]
            while '"""' not in body:
                assert i < len(lines), "unterminated triple-quoted value"
                body += "\n" + lines[i]
                i += 1
            value, rest = body.split('"""', 1)
            assert not rest.strip(), f"text after a closing triple quote: {rest!r}"
        out.append((name, value))
    return out


def render_go_template(template: str, data: dict) -> str:
    """The part of Go's text/template the exported templates use: ``{{- ... -}}`` trimming,
    ``if``/``else``/``end``, ``range``, ``ne``/``eq`` on strings, and ``.Field`` of the data
    or of the current element."""
    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)
    tokens = []
    for k, p in enumerate(parts):
        if p.startswith("{{"):
            if p.startswith("{{-") and tokens and tokens[-1][0] == "text":
                tokens[-1] = ("text", tokens[-1][1].rstrip())
            tokens.append(("action", p.strip("{}").strip("-").strip()))
            if p.endswith("-}}") and k + 1 < len(parts):
                parts[k + 1] = parts[k + 1].lstrip()
        else:
            tokens.append(("text", p))

    def value(expr, dot):
        if expr.startswith('"'):
            return json.loads(expr)
        if expr.startswith("."):
            field = expr[1:]
            return dot.get(field, data.get(field)) if isinstance(dot, dict) else data.get(field)
        raise AssertionError(f"unsupported expression {expr!r}")

    def test(cond, dot):
        words = re.findall(r'"[^"]*"|\S+', cond)
        if words[0] in ("eq", "ne"):
            same = value(words[1], dot) == value(words[2], dot)
            return same if words[0] == "eq" else not same
        return bool(value(words[0], dot))

    def block(i, dot, out):
        while i < len(tokens):
            kind, text = tokens[i]
            if kind == "text":
                out.append(text)
                i += 1
            elif text in ("end", "else"):
                return i
            elif text.startswith("if "):
                yes = test(text[3:], dot)
                j = block(i + 1, dot, out if yes else [])
                if tokens[j][1] == "else":
                    j = block(j + 1, dot, [] if yes else out)
                i = j + 1
            elif text.startswith("range "):
                items = value(text[6:], dot)
                j = i + 1
                for item in items:
                    j = block(i + 1, item, out)
                if not items:
                    j = block(i + 1, {}, [])
                i = j + 1
            else:
                out.append(str(value(text, dot)))
                i += 1
        return i

    out: list[str] = []
    assert block(0, data, out) == len(tokens), "unbalanced template"
    return "".join(out)


def test_eval_figures_go_in_the_model_card_and_a_file_without_the_model_is_refused(tuned, tmp_path, capsys):
    import json

    home, model_id, _, _ = tuned
    data = home / "train.jsonl"
    args = ["eval", "--backend", "local", "--home", str(home), "-m", model_id, "-d", str(data), "--train", str(data)]
    assert main([*args, "--mode", "free", "--max-tokens", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(figures))
    out = tmp_path / "with-eval"
    assert export(home, model_id, "-o", out, "--format", "adapter", "--eval", results) == 0
    card = (out / "README.md").read_text()
    mine = figures["results"][model_id]
    metric = next(k for k, v in mine.items() if isinstance(v, float))
    assert "## Evaluation" in card and f"`{data}`" in card
    assert f"| {metric} | {float(mine[metric]):.4g} |" in card
    if "vs_baseline" in mine:  # a classification model: its difference from the baseline, with the interval
        assert "| macro-F1 minus " in card and "95 % interval" in card
    figures["results"] = {"someone-else": mine}
    results.write_text(json.dumps(figures))
    refused = tmp_path / "refused"
    assert export(home, model_id, "-o", refused, "--format", "adapter", "--eval", results) != 0
    err = capsys.readouterr().err
    assert f"{results}: no results for {model_id}" in err and not refused.exists()
