"""Exporting a model to run where people already run models.

Three formats, each one directory:

- ``hf``: the LoRA merged into the base weights, as a Hugging Face model directory (safetensors,
  tokenizer with its chat template, a generation config whose stop tokens are the end of a turn,
  and a model card). ``transformers``, vLLM or a pipeline load it with nothing of ours installed.
- ``gguf``: the merged model as one GGUF file (llama.cpp, Ollama, LM Studio) in f32, f16, bf16
  or q8_0, with an Ollama ``Modelfile`` beside it.
- ``adapter``: the LoRA adapter alone, as PEFT wrote it and as a llama.cpp LoRA GGUF for
  ``--lora`` beside the base model's GGUF.

GGUF is written with the ``gguf`` package (its writer, tensor-name map and quantisation), not
with llama.cpp's conversion scripts: those are not on PyPI, and the part we need (Llama-family
tensors, already in memory) is small. Two pieces are ours because the package leaves them to
those scripts: the row permutation of the query and key projections (below) and which metadata
keys a Llama GGUF carries. The tokenizer metadata is copied verbatim from the GGUF file the
default base model came from (it is what llama.cpp's own conversion wrote), so the exported file
tokenizes exactly as the base did; a base with another vocabulary is refused for GGUF with the
way to convert its ``hf`` export instead.

Every export is written under a temporary name beside the target, read back once (tensor names,
shapes and types; metadata), and only then renamed into place; an existing target is kept
unless ``force`` is given, and is replaced only after the new export is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DependencyError, GptFinetuneError

FORMATS = ("hf", "gguf", "adapter")
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_DTYPES = ("f32", "f16", "bf16")  # a LoRA's rank (8, 16) is shorter than q8_0's blocks of 32
DEFAULT_DTYPE = {"gguf": "q8_0", "adapter": "f32"}
# Hugging Face model types whose tensors llama.cpp's "llama" architecture takes as they are
# (Mistral's layout is Llama's: llama.cpp converts both to "llama")
LLAMA_TYPES = ("llama", "mistral")
Q8_BLOCK = 32


@dataclass(frozen=True)
class ExportSource:
    """What one model is made of, as the data directory knows it."""

    model_id: str
    base_id: str  # the base model's name (a catalog id or a directory's name)
    base_dir: str  # the base model's Hugging Face directory (its tokenizer is the one inference uses)
    adapter_dir: str | None = None  # the LoRA adapter; None for a base or fully trained model
    full_dir: str | None = None  # a fully trained model's own weights
    tokenizer_gguf: str | None = None  # a GGUF file with this vocabulary (the default base's)
    system_prompt: str | None = None  # what the job's examples said as system, for Ollama's SYSTEM
    max_length: int | None = None  # the tokens of one training example (Ollama's num_ctx)
    card: dict[str, Any] = field(default_factory=dict)  # job, hyperparameters, data, results


@dataclass
class ExportResult:
    path: Path
    files: list[str]
    run: list[str]  # the commands that run the result elsewhere


def check_request(fmt: str, dtype: str | None) -> str:
    """The dtype an export uses (its format's default when None); a bad pair is one clear error."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "hf":
        if dtype not in (None, "f32", "f16", "bf16"):
            raise ConfigError(f"--dtype {dtype}: an hf export is saved in f32, f16 or bf16")
        return dtype or "f32"
    allowed = GGUF_DTYPES if fmt == "gguf" else ADAPTER_DTYPES
    if dtype is not None and dtype not in allowed:
        raise ConfigError(f"--dtype {dtype}: a {fmt} export takes {', '.join(allowed)}")
    return dtype or DEFAULT_DTYPE[fmt]


class ExportError(GptFinetuneError):
    """A written file that does not read back as it was written: nothing is kept, and it is our bug."""

    code = "export_failed"
    status = 500
    type = "server_error"


def export(
    source: ExportSource,
    out: str | Path,
    fmt: str,
    dtype: str | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] = lambda _m: None,
) -> ExportResult:
    dtype = check_request(fmt, dtype)
    target = Path(out).expanduser().absolute()
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(f"{target} already exists; nothing was written", hint="choose another path, or --force")
    if fmt == "adapter" and source.adapter_dir is None:
        what = "fully trained" if source.full_dir else "a base model"
        raise ConfigError(
            f"{source.model_id} is {what}: it has no LoRA adapter to export",
            hint="export it whole: --format hf or --format gguf",
        )
    missing = [n for n in ("torch", "transformers", "gguf", "safetensors") if _missing(n)]
    if missing:
        raise DependencyError(f"exporting needs the local engine (missing: {', '.join(missing)})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "hf":
            files, run = _export_hf(source, tmp, dtype, progress)
        elif fmt == "gguf":
            files, run = _export_gguf(source, tmp, dtype, progress)
        else:
            files, run = _export_adapter(source, tmp, dtype, progress)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(target, files, [r.replace(str(tmp), str(target)) for r in run])


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _replace(tmp: Path, target: Path) -> None:
    """Move the finished export into place; what was there (``--force``) goes only afterwards."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.replaced-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def slug(model_id: str) -> str:
    """A file name from a model id: ``ft:SmolLM2-135M-Instruct:labels:ftjob-abc`` ->
    ``SmolLM2-135M-Instruct-labels-ftjob-abc``."""
    parts = [p for p in model_id.split(":") if p and p != "ft"]
    name = "-".join(parts) or "model"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:120]


# ---- the merged model ---------------------------------------------------------------------------------
def load_merged(source: ExportSource) -> tuple[Any, Any]:
    """(the model with its LoRA merged in, in f32, and the tokenizer inference uses for it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.full_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(source.full_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.full_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.base_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.base_dir)
        if source.adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.adapter_dir).merge_and_unload()
    model.eval()
    return model, tokenizer


def loading_message(source: ExportSource) -> str:
    if source.adapter_dir is not None:
        return "merging the adapter into the base weights"
    return "loading the fully trained weights" if source.full_dir else "loading the base weights"


def end_of_turn_ids(tokenizer: Any, model: Any) -> list[int]:
    """The tokens a reply ends on: the tokenizer's end-of-sequence and the generation config's
    (which for chat models include the end-of-turn token), as inference stops on them."""
    ids: list[int] = []
    for t in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in t if isinstance(t, list) else [t]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


# ---- hf -----------------------------------------------------------------------------------------------
def _export_hf(
    source: ExportSource, tmp: Path, dtype: str, progress: Callable[[str], None]
) -> tuple[list[str], list[str]]:
    import torch

    progress(loading_message(source))
    model, tokenizer = load_merged(source)
    if dtype != "f32":
        model = model.to({"f16": torch.float16, "bf16": torch.bfloat16}[dtype])
    stops = end_of_turn_ids(tokenizer, model)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    progress("saving safetensors")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(source, "hf", dtype), encoding="utf-8")
    verify_hf(tmp, model)
    run = [
        f"python -c \"from transformers import pipeline; p = pipeline('text-generation', '{tmp}'); "
        "print(p([{'role': 'user', 'content': 'hello'}], max_new_tokens=32)[0]['generated_text'][-1])\"",
        f"vllm serve {tmp}",
    ]
    return sorted(p.name for p in tmp.iterdir()), run


def verify_hf(path: Path, model: Any) -> None:
    """Read the saved directory back: the same tensors with the same shapes, and a config that loads."""
    from safetensors import safe_open
    from transformers import AutoConfig

    AutoConfig.from_pretrained(path)
    saved: dict[str, tuple[int, ...]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                saved[k] = tuple(st.get_slice(k).get_shape())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected = {k: v for k, v in expected.items() if k in saved or not k.startswith("lm_head")}
    if saved != expected:
        wrong = sorted(set(saved.items()) ^ set(expected.items()))[:4]
        raise ExportError(f"the saved model does not read back as written (first differences: {wrong})")


# ---- gguf ---------------------------------------------------------------------------------------------
def permute_rows(weights: Any, n_head: int) -> Any:
    """Hugging Face's Llama applies rotary embeddings to the two halves of each head's dimensions
    (``rotate_half``); llama.cpp's to adjacent pairs. llama.cpp's conversion reorders the rows of
    the query and key projections (per head: row i of the first half and row i of the second half
    become neighbours), and transformers undoes it when it reads a GGUF. Works for a weight
    (out, in) or a LoRA B (out, r): only rows move."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _llama_config(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a model llama.cpp's llama architecture runs;
    anything else is refused with what to do."""
    kind = getattr(config, "model_type", None)
    if kind not in LLAMA_TYPES:
        raise ConfigError(
            f"GGUF export supports the Llama family ({', '.join(LLAMA_TYPES)} models, SmolLM2 among them); "
            f"this model is {kind!r}",
            hint="export --format hf, then convert that directory with llama.cpp's convert_hf_to_gguf.py",
        )
    scaling = getattr(config, "rope_scaling", None)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise ConfigError(
            f"GGUF export does not write rotary scaling ({scaling.get('rope_type') or scaling.get('type')})",
            hint="export --format hf, then convert that directory with llama.cpp's convert_hf_to_gguf.py",
        )
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, head_dim


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it among rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _tokenizer_fields(source: ExportSource, tokenizer: Any) -> list[Any]:
    """The ``tokenizer.*`` fields of the GGUF file this vocabulary came from, checked to be the
    same vocabulary token for token; refused otherwise."""
    import gguf

    hint = "export --format hf, then convert that directory with llama.cpp's convert_hf_to_gguf.py"
    if source.tokenizer_gguf is None:
        raise ConfigError(
            f"GGUF export needs the base model's tokenizer as a GGUF file; {source.base_id} has none here", hint=hint
        )
    reader = gguf.GGUFReader(source.tokenizer_gguf)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if tokens != tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        raise ConfigError(
            f"the tokenizer of {source.model_id} is not the one of {Path(source.tokenizer_gguf).name}", hint=hint
        )
    return [f for name, f in reader.fields.items() if name.startswith("tokenizer.")]


def write_gguf(
    path: Path, model: Any, tokenizer: Any, source: ExportSource, dtype: str, progress: Callable[[str], None]
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Write ``model`` as one GGUF file; returns what was written (name -> (shape, type)) so the
    file can be read back against it."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    config = model.config
    heads, kv_heads, head_dim = _llama_config(config)
    fields = _tokenizer_fields(source, tokenizer)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    writer = gguf.GGUFWriter(str(path), arch)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.model_id)
    writer.add_description(f"{source.model_id}, exported by gpt-finetune from {source.base_id}")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    for f in fields:
        if f.name == "tokenizer.chat_template":
            continue  # written below: the template the model was trained and is served with
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    written: dict[str, tuple[tuple[int, ...], str]] = {}
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for i, (hf_name, tensor) in enumerate(state.items()):
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the embeddings serve as the output layer
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: {hf_name} has no llama.cpp name (an unsupported variant of Llama)")
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_rows(data, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_rows(data, kv_heads)
        qtype = _tensor_type(data, dtype)
        if qtype == Q.F32:
            out = data.astype(np.float32)
        elif qtype == Q.F16:
            out = data.astype(np.float16)
        else:
            out = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, out, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        written[name] = (tuple(data.shape), qtype.name)
        if i % 50 == 0:
            progress(f"tensors: {i + 1}/{len(state)}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _tensor_type(data: Any, dtype: str) -> Any:
    """llama.cpp's choices: vectors (norms) stay f32; matrices take the export's type; q8_0 needs
    rows in whole blocks of 32, and a matrix whose rows are not falls back to f16."""
    from gguf import GGMLQuantizationType as Q

    if data.ndim == 1 or dtype == "f32":
        return Q.F32
    if dtype == "q8_0":
        return Q.Q8_0 if data.shape[-1] % Q8_BLOCK == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[dtype]


def verify_gguf(path: Path, written: dict[str, tuple[tuple[int, ...], str]], required: tuple[str, ...]) -> None:
    """Read a written GGUF back: the same tensors (names, shapes, types) and the metadata llama.cpp needs."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}
    # GGUF lists dimensions innermost first; a 1-D tensor reads back as (n,)
    expected = {k: (s, q) for k, (s, q) in written.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected))[:4] or [k for k in found if found[k] != expected.get(k)][:4]
        raise ExportError(
            f"{path.name} does not read back as written ({len(found)} tensors; first differences: {wrong})"
        )
    absent = [k for k in required if k not in reader.fields]
    if absent:
        raise ExportError(f"{path.name} lacks metadata llama.cpp needs: {', '.join(absent)}")


GGUF_REQUIRED = (
    "general.architecture",
    "llama.block_count",
    "llama.embedding_length",
    "llama.attention.head_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.chat_template",
)


def _export_gguf(
    source: ExportSource, tmp: Path, dtype: str, progress: Callable[[str], None]
) -> tuple[list[str], list[str]]:
    progress(loading_message(source))
    model, tokenizer = load_merged(source)
    _llama_config(model.config)  # refuse early, before anything is written
    name = f"{slug(source.model_id)}.{dtype}.gguf"
    progress(f"writing {name}")
    written = write_gguf(tmp / name, model, tokenizer, source, dtype, progress)
    verify_gguf(tmp / name, written, GGUF_REQUIRED)
    modelfile, template_note = ollama_modelfile(f"./{name}", tokenizer, model, source)
    (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
    (tmp / "README.md").write_text(model_card(source, "gguf", dtype, note=template_note), encoding="utf-8")
    tag = slug(source.model_id).lower()
    run = [
        f"llama-cli -m {tmp / name} -cnv",
        f"llama-server -m {tmp / name} --port 8081",
        f"cd {tmp} && ollama create {tag} -f Modelfile && ollama run {tag}",
    ]
    return sorted(p.name for p in tmp.iterdir()), run


# ---- Ollama -------------------------------------------------------------------------------------------
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""
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
}  # Ollama's documented Modelfile parameters (docs/modelfile.md)


def chat_format(tokenizer: Any) -> tuple[str | None, str | None]:
    """(the prompt format the chat template renders, the system prompt it adds when none is given).

    Found by rendering, not by reading the Jinja: a conversation rendered by the template is
    compared with what ChatML would make of it. Ollama's templates are Go templates, so only a
    format we can write as one is written; another is left to Ollama's own template detection."""
    if not tokenizer.chat_template:
        return None, None
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    try:
        got = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        bare = tokenizer.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that needs other inputs (tools): not one we translate
        return None, None
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"
    if got != chatml:
        return None, None
    default = None
    head = "<|im_start|>system\n"
    if bare.startswith(head):  # the template adds a system prompt of its own (SmolLM2 does)
        default = bare[len(head) : bare.index("<|im_end|>")]
    return "chatml", default


def ollama_modelfile(gguf_ref: str, tokenizer: Any, model: Any, source: ExportSource) -> tuple[str, str | None]:
    """An Ollama Modelfile (docs/modelfile.md) for the exported file; and a note when the
    chat format could not be written as an Ollama template."""
    fmt, default_system = chat_format(tokenizer)
    system = source.system_prompt or default_system
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer, model)]
    lines = [
        f"# {source.model_id}, exported by gpt-finetune from {source.base_id}",
        f"# ollama create {slug(source.model_id).lower()} -f Modelfile",
        f"FROM {gguf_ref}",
    ]
    note = None
    if fmt == "chatml":
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    else:
        note = "the chat template is not ChatML; the Modelfile leaves the template to Ollama's detection"
        lines.append(f"# {note}")
    if system:
        lines.append(f'SYSTEM """{_triple_quoted(system)}"""')
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    ctx = source.max_length or min(int(model.config.max_position_embeddings), 8192)
    lines.append(f"PARAMETER num_ctx {ctx}")
    lines.append("PARAMETER temperature 0")  # greedy, as gpt-finetune's eval and label prediction answer
    return "\n".join(lines) + "\n", note


def _triple_quoted(text: str) -> str:
    # a Modelfile value ends at the first """: keep it out of the value
    return text.replace('"""', '" " "')


# ---- adapter ------------------------------------------------------------------------------------------
def _export_adapter(
    source: ExportSource, tmp: Path, dtype: str, progress: Callable[[str], None]
) -> tuple[list[str], list[str]]:
    from transformers import AutoConfig, AutoTokenizer

    assert source.adapter_dir is not None
    adapter = Path(source.adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / name).is_file():
            raise ConfigError(f"the adapter of {source.model_id} lacks {name} ({adapter})")
        shutil.copy2(adapter / name, tmp / name)
    config = AutoConfig.from_pretrained(source.base_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.base_dir)
    name = f"{slug(source.model_id)}.lora-{dtype}.gguf"
    progress(f"writing {name}")
    written = write_lora_gguf(tmp / name, adapter, config, source, dtype)
    verify_gguf(tmp / name, written, ("general.architecture", "adapter.type", "adapter.lora.alpha"))
    (tmp / "README.md").write_text(model_card(source, "adapter", dtype), encoding="utf-8")
    files = sorted(p.name for p in tmp.iterdir())
    base_gguf = source.tokenizer_gguf if source.tokenizer_gguf and _same_vocab(source, tokenizer) else "BASE.gguf"
    run = [f"llama-cli -m {base_gguf} --lora {tmp / name} -cnv"]
    return files, run


def _same_vocab(source: ExportSource, tokenizer: Any) -> bool:
    try:
        _tokenizer_fields(source, tokenizer)
        return True
    except ConfigError:
        return False


def write_lora_gguf(
    path: Path, adapter: Path, config: Any, source: ExportSource, dtype: str
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The adapter as llama.cpp's LoRA GGUF: for each adapted weight ``W`` named ``N`` in the
    base's GGUF, ``N.lora_a`` (A: rank x in) and ``N.lora_b`` (B: out x rank), B's rows permuted
    as the base's are for the query and key projections. llama.cpp scales B·A by alpha / rank,
    so ``adapter.lora.alpha`` is PEFT's scale times the rank (rsLoRA included)."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from safetensors.numpy import load_file

    heads, kv_heads, _ = _llama_config(config)
    lora = json.loads((adapter / "adapter_config.json").read_text())
    if lora.get("peft_type", "LORA") != "LORA" or lora.get("use_dora") or lora.get("modules_to_save"):
        raise ConfigError(
            "this adapter is not a plain LoRA (DoRA, or modules trained whole): llama.cpp's --lora cannot take it",
            hint="export it merged: --format gguf",
        )
    if lora.get("rank_pattern") or lora.get("alpha_pattern"):
        raise ConfigError("this adapter has per-layer ranks or alphas, which llama.cpp's LoRA format cannot state")
    r, alpha = int(lora["r"]), float(lora["lora_alpha"])
    scale = alpha / (r**0.5) if lora.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(source.model_id)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * r)
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]
    written: dict[str, tuple[tuple[int, ...], str]] = {}
    for key in sorted(tensors):
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ConfigError(f"the adapter holds {key}, which is not a LoRA matrix")
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        base_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if base_name is None:
            raise ConfigError(f"the adapter adapts {module}, which llama.cpp's llama architecture does not have")
        a = tensors[key].astype(np.float32)
        b = tensors[key.replace(".lora_A.", ".lora_B.")].astype(np.float32)
        if module.endswith("self_attn.q_proj"):
            b = permute_rows(b, heads)
        elif module.endswith("self_attn.k_proj"):
            b = permute_rows(b, kv_heads)
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            out = (
                data
                if qtype == Q.F32
                else data.astype(np.float16)
                if qtype == Q.F16
                else gguf.quants.quantize(data, qtype)
            )
            writer.add_tensor(base_name + suffix, out, raw_dtype=qtype if qtype == Q.BF16 else None)
            written[base_name + suffix] = (tuple(data.shape), qtype.name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


# ---- the model card -----------------------------------------------------------------------------------
def model_card(source: ExportSource, fmt: str, dtype: str, *, note: str | None = None) -> str:
    """A Hugging Face model card (YAML front matter, then what the model is and how it was made)."""
    card = source.card
    base_ref = card.get("base_model_ref") or source.base_id
    lines = [
        "---",
        f"base_model: {base_ref}",
        "library_name: " + ("peft" if fmt == "adapter" else "transformers"),
        "tags:",
        "- gpt-finetune",
        "- fine-tuned" if source.adapter_dir or source.full_dir else "- base-model",
        "---",
        "",
        f"# {source.model_id}",
        "",
        f"Exported by gpt-finetune as `{fmt}` ({dtype}) from base model `{source.base_id}`.",
        "",
    ]
    rows = [("Job", card.get("job_id")), ("Method", card.get("method")), ("Training file", card.get("training_file"))]
    rows += [("Training examples", card.get("n_examples")), ("Trained tokens", card.get("trained_tokens"))]
    rows += [("Labels", card.get("labels")), ("System prompt", source.system_prompt)]
    rows += [(f"Hyperparameter `{k}`", v) for k, v in (card.get("hyperparameters") or {}).items()]
    rows += [(f"LoRA `{k}`", v) for k, v in (card.get("lora") or {}).items()]
    known = [(k, v) for k, v in rows if v not in (None, "", [])]
    if known:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in known] + [""]
    results = card.get("results") or {}
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in results.items()] + [""]
    lines += _evaluation_lines(card.get("evaluation"))
    if note:
        lines += [f"Note: {note}.", ""]
    return "\n".join(lines)


def _evaluation_lines(ev: dict[str, Any] | None) -> list[str]:
    """``gpt-finetune eval``'s figures for this model (``models export --eval``): its scalar
    metrics, and the macro-F1 difference from the best cheap baseline with its interval."""
    if not ev:
        return []
    where = f" on `{ev['data']}`" if ev.get("data") else ""
    lines = ["## Evaluation", "", f"By `gpt-finetune eval`{where} ({ev.get('task') or 'task not said'}):", ""]
    lines += ["| metric | value |", "|---|---|"]
    for key, value in ev.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            lines.append(f"| {key} | {_cell(value)} |")
    diff = ev.get("vs_baseline")
    if isinstance(diff, list | tuple) and len(diff) == 3:
        point, lo, hi = (float(x) for x in diff)
        against = ev.get("baseline") or "the baseline"
        lines.append(f"| macro-F1 minus {against}'s | {point:+.3f} (95 % interval {lo:+.3f} to {hi:+.3f}) |")
    return [*lines, ""]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    elif isinstance(value, list | tuple):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")
