"""Generation with base models and fine-tuned adapters.

An ``Engine`` loads each base model once and attaches adapters to it by name (PEFT), so a
fine-tuned model or checkpoint costs only its adapter's load; the base model is used with the
adapters switched off. Greedy decoding at temperature 0, sampling otherwise; generation stops
at the end-of-turn token (EOS) or ``max_tokens``; tokens can be streamed as they come.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..home import Home
from .base_models import model_dir, resolve_base

DEFAULT_MAX_TOKENS = 256


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class Engine:
    def __init__(self, home: Home, local_base_model: str | None = None) -> None:
        self.home = home
        self.local_base_model = local_base_model
        self._bases: dict[str, Any] = {}  # base name -> (model, tokenizer, adapters loaded)
        self._lock = threading.RLock()

    def _load(self, base_name: str, adapter: str | None) -> tuple[Any, Any, Any]:
        """(model, tokenizer, context): generate inside the context, which switches adapters
        off when the base model itself is asked and adapters are attached to it."""
        from contextlib import nullcontext

        model, tokenizer = self._load_model(base_name, adapter)
        if adapter is None and hasattr(model, "disable_adapter"):
            return model, tokenizer, model.disable_adapter()
        return model, tokenizer, nullcontext()

    def _load_model(self, base_name: str, adapter: str | None) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with self._lock:
            if base_name not in self._bases:
                base = resolve_base(base_name, self.local_base_model)
                path = model_dir(base, self.home)
                dtype = (
                    torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
                )
                model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
                if torch.cuda.is_available():
                    model = model.to("cuda")
                model.eval()
                self._bases[base_name] = [model, AutoTokenizer.from_pretrained(path), set()]
            entry = self._bases[base_name]
            model, tokenizer, adapters = entry[0], entry[1], entry[2]
            if adapter is None:
                return model, tokenizer
            if (Path(adapter) / "adapter_config.json").is_file():
                from peft import PeftModel

                name = Path(adapter).as_posix().replace(".", "_").replace("/", "__")
                if not adapters:
                    model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
                    entry[0] = model
                elif name not in adapters:
                    model.load_adapter(adapter, adapter_name=name)
                adapters.add(name)
                model.set_adapter(name)
                return model, tokenizer
            # a fully fine-tuned model: its own weights
            key = f"full:{adapter}"
            if key not in self._bases:
                full = AutoModelForCausalLM.from_pretrained(adapter, dtype=model.dtype).to(model.device).eval()
                self._bases[key] = [full, AutoTokenizer.from_pretrained(adapter), set()]
            return self._bases[key][0], self._bases[key][1]

    def _inputs(self, tokenizer: Any, messages: list[dict[str, Any]], device: Any, limit: int) -> Any:
        from .chat_data import fit_messages

        fitted = fit_messages(tokenizer, messages, limit, add_generation_prompt=True)
        if fitted is not None:  # else not even the shortest prompt fits: let the model see it whole
            messages = fitted[0]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return {k: v.to(device) for k, v in ids.items()}

    @staticmethod
    def _prompt_limit(model: Any, adapter: str | None, max_new_tokens: int) -> int:
        """How long a prompt may be: a fine-tuned model's training max_length (its long prompts
        were shortened to fit it, and are shortened the same way here), else the model's context,
        less the tokens to generate."""
        import json

        from .chat_data import TRAINING_SHAPE

        context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
        limit = context
        if adapter is not None and (Path(adapter) / TRAINING_SHAPE).is_file():
            limit = min(context, int(json.loads((Path(adapter) / TRAINING_SHAPE).read_text())["max_length"]))
        return max(limit - max_new_tokens, limit // 2)

    def _gen_kwargs(
        self, tokenizer: Any, max_tokens: int | None, temperature: float | None, seed: int | None
    ) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {
            "max_new_tokens": max_tokens or DEFAULT_MAX_TOKENS,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if temperature is None or temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature if temperature is not None else 1.0, top_k=0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _prepare(
        self,
        base: str,
        adapter: str | None,
        messages: list[dict[str, Any]],
        max_tokens: int | None,
        temperature: float | None,
        seed: int | None,
    ) -> tuple[Any, Any, Any, dict[str, Any], dict[str, Any]]:
        """What both verbs need: model, tokenizer, adapter context, prompt tensors, generate kwargs."""
        model, tokenizer, ctx = self._load(base, adapter)
        gen = self._gen_kwargs(tokenizer, max_tokens, temperature, seed)
        inputs = self._inputs(
            tokenizer, messages, model.device, self._prompt_limit(model, adapter, gen["max_new_tokens"])
        )
        return model, tokenizer, ctx, inputs, gen

    def complete(
        self,
        base: str,
        adapter: str | None,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Completion:
        import torch

        with self._lock:
            model, tokenizer, ctx, inputs, gen = self._prepare(base, adapter, messages, max_tokens, temperature, seed)
            with torch.inference_mode(), ctx:
                out = model.generate(**inputs, **gen)
        new = out[0, inputs["input_ids"].shape[1] :]
        stopped = len(new) > 0 and int(new[-1]) == tokenizer.eos_token_id
        text = tokenizer.decode(new, skip_special_tokens=True)
        return Completion(
            text,
            int(inputs["input_ids"].shape[1]),
            len(new),
            "stop" if stopped or len(new) < (max_tokens or DEFAULT_MAX_TOKENS) else "length",
        )

    def stream(
        self,
        base: str,
        adapter: str | None,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        self._lock.acquire()
        try:
            model, tokenizer, ctx, inputs, gen = self._prepare(base, adapter, messages, max_tokens, temperature, seed)
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs = {**inputs, **gen, "streamer": streamer}

            def run() -> None:
                with torch.inference_mode(), ctx:
                    model.generate(**kwargs)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            yield from (piece for piece in streamer if piece)
            thread.join()
        finally:
            self._lock.release()
