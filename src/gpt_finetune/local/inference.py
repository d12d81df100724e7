"""Generation with base models and fine-tuned adapters, on one engine thread.

An ``Engine`` owns its models on a thread of its own: callers ``submit`` a ``GenRequest`` and get a
``Handle`` whose events (tokens, choice ends, usage) they read from any thread or from an asyncio
loop; a request that waits when the queue is full is refused at once (``EngineBusy``, HTTP 429),
and a caller that goes away ``cancel``s its handle, which stops its generation at the next token.
No lock is ever held across a caller's generator, so a web server's dropped client cannot wedge it.

Each base model is loaded once; adapters are attached to it by a name made of their directory and
the adapter file's size and modification time, so a checkpoint saved again under the same path is
loaded afresh, never served from a stale copy, and a model whose directory is gone is detached.
The base model is used with the adapters switched off. Requests run one at a time (batched
generation across requests comes later), so each answer is the one the request gets alone.

Decoding is our own loop over the model's forward pass with its KV cache, rather than
``model.generate``: it needs the raw log-probabilities of every token as it is streamed (OpenAI's
``logprobs``), a check for cancellation between tokens, a per-request random generator (``seed``
without touching torch's global one), and stop strings cut out of the text; ``generate`` offers
each of these only separately. Greedy decoding equals ``generate``'s (tested).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base_catalog import resolve_base
from ..contract import LabelChoice
from ..errors import BackendError, GptFinetuneError
from ..home import Home
from .base_weights import model_dir

DEFAULT_MAX_TOKENS = 256
UNKNOWN_CONTEXT = 2048  # a model whose config states no context length (Llama's first models had this)


def _context_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0) or UNKNOWN_CONTEXT


DEFAULT_QUEUE = 64
log = logging.getLogger("gpt_finetune.engine")


class EngineBusy(GptFinetuneError):
    """The engine's queue is full: try again later (HTTP 429 with Retry-After)."""

    code = "rate_limit_exceeded"
    status = 429
    type = "requests"


@dataclass
class GenRequest:
    base: str  # a base model name for resolve_base
    adapter: str | None  # an adapter or full model directory, or None for the base model
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None  # None: 1.0 (OpenAI's default); 0: greedy
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    choices: list[str] | None = None  # label-constrained: answer with the most likely of these
    # label by label: any subset of these labels, written in this label format (scoring.choose_labels)
    label_choice: LabelChoice | None = None
    batch: list[list[dict[str, Any]]] | None = None  # several prompts at once, greedy (eval, batch files)


@dataclass
class Token:
    choice: int
    token_id: int
    text: str  # the new text this token makes visible (may be empty: held back)
    logprob: dict[str, Any] | None  # OpenAI's ChatCompletionTokenLogprob, when asked


@dataclass
class ChoiceEnd:
    choice: int
    finish_reason: str  # "stop" or "length"
    text: str  # the whole answer
    token_ids: list[int]
    scores: list[float] | None = None  # label-constrained: each choice's summed log-probability
    prompt_tokens: int = 0  # batched answers: this prompt's own length


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: BaseException


class Handle:
    """One request's results, in order: ``Token``s and a ``ChoiceEnd`` per choice, then ``Usage``
    (or ``Failed``). Read with ``events()`` (blocking) or ``aevents()`` (asyncio)."""

    def __init__(self, request: GenRequest) -> None:
        self.request = request
        self.cancelled = threading.Event()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue[Any] | None = None
        self._lock = threading.Lock()
        self._backlog: list[Any] = []

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, item: Any) -> None:
        with self._lock:
            if self._loop is not None and self._aq is not None:
                try:
                    self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
                except RuntimeError:  # the loop closed: nobody is listening any more
                    self.cancel()
            else:
                self._q.put(item)

    def events(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            yield item
            if isinstance(item, (Usage, Failed)):
                return

    async def aevents(self) -> AsyncIterator[Any]:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._aq = asyncio.Queue()
            while True:  # what came before the loop attached
                try:
                    self._aq.put_nowait(self._q.get_nowait())
                except queue.Empty:
                    break
        while True:
            item = await self._aq.get()
            yield item
            if isinstance(item, (Usage, Failed)):
                return


class Engine:
    def __init__(self, home: Home, local_base_model: str | None = None, *, max_queue: int = DEFAULT_QUEUE) -> None:
        self.home = home
        self.local_base_model = local_base_model
        self.max_queue = max_queue
        self._bases: dict[str, list[Any]] = {}  # base name -> [model, tokenizer, {adapter name: dir}]
        self._full: dict[str, tuple[Any, Any]] = {}
        # waiting requests; a cancelled one gives its place up at once (not when the thread reaches it)
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # ---- the caller's side --------------------------------------------------------------------
    def submit(self, request: GenRequest) -> Handle:
        handle = Handle(request)
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="gpt-finetune-engine", daemon=True)
                self._thread.start()
        with self._cond:
            self._drop_cancelled()
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(
                    f"the engine has {self.max_queue} requests waiting; try again shortly",
                    hint="raise the server's --max-queue, or send fewer requests at once",
                )
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def _drop_cancelled(self) -> None:
        if any(h.cancelled.is_set() for h in self._waiting):
            self._waiting = collections.deque(h for h in self._waiting if not h.cancelled.is_set())

    def pending(self) -> int:
        """Requests waiting for the engine (not counting the one it is answering)."""
        with self._cond:
            self._drop_cancelled()
            return len(self._waiting)

    def run(self, request: GenRequest) -> list[ChoiceEnd | Usage]:
        """Submit and wait: the ``ChoiceEnd`` of each choice, then ``Usage``."""
        out: list[ChoiceEnd | Usage] = []
        for item in self.submit(request).events():
            if isinstance(item, Failed):
                raise item.error
            if isinstance(item, (ChoiceEnd, Usage)):
                out.append(item)
        return out

    def complete(self, base: str, adapter: str | None, messages: list[dict[str, Any]], **kw: Any) -> ChoiceEnd:
        """One answer (the first choice), waiting for it."""
        return next(e for e in self.run(GenRequest(base, adapter, messages, **kw)) if isinstance(e, ChoiceEnd))

    def stream(self, base: str, adapter: str | None, messages: list[dict[str, Any]], **kw: Any) -> Iterator[str]:
        """The first choice's text as it comes; stopping early cancels the generation."""
        handle = self.submit(GenRequest(base, adapter, messages, **kw))
        try:
            for item in handle.events():
                if isinstance(item, Failed):
                    raise item.error
                if isinstance(item, Token) and item.text and item.choice == 0:
                    yield item.text
        finally:
            handle.cancel()

    # ---- the engine thread --------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                handle = self._waiting.popleft()
            if handle.cancelled.is_set():
                continue  # its caller left while it waited
            try:
                self._generate(handle)
            except BaseException as exc:  # reported to the caller; the engine keeps serving
                if not isinstance(exc, GptFinetuneError):
                    log.exception("generation failed")
                handle.emit(Failed(exc))

    def _load(self, base_name: str, adapter: str | None) -> tuple[Any, Any, Any]:
        """(model, tokenizer, context to generate in). Runs on the engine thread only."""
        from contextlib import nullcontext

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if base_name not in self._bases:
            base = resolve_base(base_name, self.local_base_model)
            path = model_dir(base, self.home)
            dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
            model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            if torch.cuda.is_available():
                model = model.to("cuda")
            model.eval()
            self._bases[base_name] = [model, AutoTokenizer.from_pretrained(path), {}]
        entry = self._bases[base_name]
        model, tokenizer, attached = entry
        self._detach_gone(entry)
        model = entry[0]
        if adapter is None:
            if attached and hasattr(model, "disable_adapter"):
                return model, tokenizer, model.disable_adapter()
            return model, tokenizer, nullcontext()
        weights = Path(adapter) / "adapter_config.json"
        if weights.is_file():
            from peft import PeftModel

            name = _adapter_name(Path(adapter))
            if name not in attached:
                if not attached:  # the first adapter makes the base model a PeftModel
                    model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
                    model.eval()
                    entry[0] = model
                else:
                    model.load_adapter(adapter, adapter_name=name)
                attached[name] = adapter
            model.set_adapter(name)
            return model, tokenizer, nullcontext()
        # a fully fine-tuned model: its own weights
        key = f"{adapter}@{_stamp(Path(adapter) / 'model.safetensors')}"
        if key not in self._full:
            for old in [k for k in self._full if k.split("@")[0] == adapter]:
                del self._full[old]
            full = AutoModelForCausalLM.from_pretrained(adapter, dtype=model.dtype).to(model.device).eval()
            self._full[key] = (full, AutoTokenizer.from_pretrained(adapter))
        return self._full[key][0], self._full[key][1], nullcontext()

    @staticmethod
    def _detach_gone(entry: list[Any]) -> None:
        """Forget adapters whose files were deleted or saved again (their name changes)."""
        model, _, attached = entry
        for name, directory in list(attached.items()):
            if _adapter_name(Path(directory)) != name:
                del attached[name]
                if len(getattr(model, "peft_config", {})) > 1:
                    model.delete_adapter(name)
                else:  # the last adapter: back to the plain base model
                    entry[0] = model.unload()
                    model = entry[0]

    def _inputs(self, tokenizer: Any, messages: list[dict[str, Any]], device: Any, limit: int) -> Any:
        from .chat_data import fit_messages

        fitted = fit_messages(tokenizer, messages, limit, add_generation_prompt=True)
        if fitted is None:  # not even with every user message cut short: the rest alone is too long
            raise BackendError(
                f"the conversation does not fit this model's context of {limit} prompt tokens, even with its "
                "user messages shortened: send fewer or shorter system and assistant messages",
                param="messages",
                code="context_length_exceeded",
            )
        messages = fitted[0]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return {k: v.to(device) for k, v in ids.items()}

    @staticmethod
    def _prompt_limit(model: Any, adapter: str | None, max_new_tokens: int) -> int:
        """How long a prompt may be: a fine-tuned model's training max_length (its long prompts
        were shortened to fit it, and are shortened the same way here), else the model's context,
        less the tokens to generate."""
        from .chat_data import TRAINING_SHAPE

        context = _context_length(model)
        limit = context
        if adapter is not None and (Path(adapter) / TRAINING_SHAPE).is_file():
            limit = min(context, int(json.loads((Path(adapter) / TRAINING_SHAPE).read_text())["max_length"]))
        return max(limit - max_new_tokens, limit // 2)

    def _generate(self, handle: Handle) -> None:
        import torch

        req = handle.request
        model, tokenizer, ctx = self._load(req.base, req.adapter)
        max_new = req.max_tokens or DEFAULT_MAX_TOKENS
        context = _context_length(model)
        if max_new > context:  # as OpenAI: never more new tokens than the model can attend to
            raise BackendError(
                f"max_tokens is too large: {max_new}. This model supports at most {context} completion tokens",
                param="max_tokens",
                code="invalid_value",
            )
        if req.choices:
            self._choose(handle, model, tokenizer, ctx)
            return
        if req.label_choice:
            self._choose_labels(handle, model, tokenizer, ctx)
            return
        if req.batch:
            self._generate_batch(handle, model, tokenizer, ctx, max_new)
            return
        inputs = self._inputs(tokenizer, req.messages, model.device, self._prompt_limit(model, req.adapter, max_new))
        prompt = inputs["input_ids"]
        generator = torch.Generator(device=model.device)
        if req.seed is not None:
            generator.manual_seed(req.seed)
        else:
            generator.seed()
        completion_tokens = 0
        with torch.inference_mode(), ctx:
            for choice in range(req.n):
                end = _decode(model, tokenizer, prompt, req, max_new, generator, handle, choice)
                completion_tokens += len(end.token_ids)
                handle.emit(end)
                if handle.cancelled.is_set():
                    break
        handle.emit(Usage(int(prompt.shape[1]), completion_tokens))

    def _generate_batch(self, handle: Handle, model: Any, tokenizer: Any, ctx: Any, max_new: int) -> None:
        """Greedy answers to several prompts in one batch (left-padded), by transformers'
        ``generate``: one ``ChoiceEnd`` per prompt, in order. Throughput for evaluation and batch
        files; streaming, sampling and logprobs stay with single requests."""
        import torch

        req = handle.request
        prompts = [
            self._inputs(tokenizer, m, model.device, self._prompt_limit(model, req.adapter, max_new))["input_ids"][0]
            for m in req.batch or []
        ]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=model.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        eos = tokenizer.eos_token_id
        with torch.inference_mode(), ctx:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        total = 0
        for i in range(len(prompts)):
            new = out[i, width:].tolist()
            stopped = eos in new
            new = new[: new.index(eos)] if stopped else new
            total += len(new)
            text = tokenizer.decode(new, skip_special_tokens=True)
            handle.emit(ChoiceEnd(i, "stop" if stopped else "length", text, new, prompt_tokens=len(prompts[i])))
        handle.emit(Usage(sum(len(p) for p in prompts), total))

    def _choose_labels(self, handle: Handle, model: Any, tokenizer: Any, ctx: Any) -> None:
        """Label by label: the subset of the labels the model scores highest, one label at a time."""
        from ..data.labels import format_labels
        from .scoring import choose_labels

        req = handle.request
        assert req.label_choice is not None
        choice = req.label_choice
        with ctx:
            answer = choose_labels(
                model,
                tokenizer,
                req.messages,
                list(choice.labels),
                choice.label_format,
                self._prompt_limit(model, req.adapter, 0),
                dict(choice.thresholds) if choice.thresholds is not None else None,
            )
        text = format_labels(answer.labels, choice.label_format)
        info = None
        if req.logprobs:
            # the answer as one "token" with its probability among the answers the search
            # scored; its top_logprobs are the labels, each with the probability that it belongs
            # in the answer (they need not sum to one: an answer holds several labels)
            order = sorted(choice.labels, key=lambda x: -answer.label_probs[x])[: req.top_logprobs]
            info = {
                **_text_logprob(text, answer.logprob),
                "top_logprobs": [_text_logprob(x, _log(answer.label_probs[x])) for x in order],
            }
        _emit_whole(handle, tokenizer, text, info)

    def _choose(self, handle: Handle, model: Any, tokenizer: Any, ctx: Any) -> None:
        """Label-constrained: the choice the model scores highest, as it was trained to write it."""
        from .scoring import score_choices

        req = handle.request
        choices = list(req.choices or [])
        with ctx:
            scores = score_choices(model, tokenizer, req.messages, choices, self._prompt_limit(model, req.adapter, 0))
        best = max(range(len(choices)), key=lambda i: scores[i])
        info = None
        if req.logprobs:
            # the answer is one choice, so its "token" is the whole choice, and its logprob the
            # choice's share of the probability the model gives the candidates together
            # (normalised over them: the confidences of a single-label answer sum to one)
            norm = candidate_logprobs(scores)
            order = sorted(range(len(choices)), key=lambda i: -norm[i])[: req.top_logprobs]
            info = {
                **_text_logprob(choices[best], norm[best]),
                "top_logprobs": [_text_logprob(choices[i], norm[i]) for i in order],
            }
        _emit_whole(handle, tokenizer, choices[best], info, scores)


def _emit_whole(handle: Handle, tokenizer: Any, text: str, info: Any, scores: list[float] | None = None) -> None:
    """A constrained answer, whole: its one "token" (with its logprobs ``info``), its end and
    its usage, as generation would have emitted them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer.apply_chat_template(handle.request.messages, add_generation_prompt=True, tokenize=True)
    handle.emit(Token(0, -1, text, info))
    handle.emit(ChoiceEnd(0, "stop", text, list(ids), scores))
    handle.emit(Usage(len(prompt["input_ids"] if isinstance(prompt, dict) else prompt), len(ids)))


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "gone"
    return f"{st.st_size}-{st.st_mtime_ns}"


def _adapter_name(directory: Path) -> str:
    """A name unique to this adapter's files: its directory and its weights' size and time."""
    weights = directory / "adapter_model.safetensors"
    if not weights.exists():
        weights = directory / "adapter_model.bin"
    raw = f"{directory.resolve().as_posix()}@{_stamp(weights)}"
    return "".join(c if c.isalnum() else "_" for c in raw)


def _token_logprob(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    return _text_logprob(tokenizer.decode([token_id]), logprob)


def _text_logprob(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "bytes": list(text.encode("utf-8")), "logprob": logprob}


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -9999.0  # OpenAI's floor for an impossible token


def candidate_logprobs(scores: list[float]) -> list[float]:
    """Each candidate's log-probability among the candidates: its summed log-probability less
    the log of their total (so the probabilities sum to one)."""
    top = max(scores)
    total = top + math.log(sum(math.exp(s - top) for s in scores))
    return [s - total for s in scores]


def _decode(
    model: Any,
    tokenizer: Any,
    prompt: Any,
    req: GenRequest,
    max_new: int,
    generator: Any,
    handle: Handle,
    choice: int,
) -> ChoiceEnd:
    """One answer, token by token, with the model's KV cache."""
    import torch

    eos = {int(t) for t in ([tokenizer.eos_token_id] if isinstance(tokenizer.eos_token_id, int) else [])}
    eos |= {int(t) for t in _as_list(getattr(model.generation_config, "eos_token_id", None))}
    # a temperature under float32's reach (5e-324 is 0.0 there: 0/0 is NaN) samples the top token
    # anyway: below MIN_TEMPERATURE the answer is greedy
    greedy = req.temperature is not None and req.temperature < MIN_TEMPERATURE
    ids: list[int] = []
    shown = 0  # characters of the answer already emitted
    text = ""
    finish = "length"
    past = None
    step_input = prompt
    # transformers 5 names the KV cache ``cache`` (``past_key_values`` before, still for some models)
    cache_arg = (
        "cache"
        if "cache"
        in inspect.signature(
            model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
        ).parameters
        else "past_key_values"
    )
    for _ in range(max_new):
        if handle.cancelled.is_set():
            finish = "stop"
            break
        out = model(input_ids=step_input, use_cache=True, **{cache_arg: past})
        past = getattr(out, cache_arg)
        logits = out.logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        if greedy:
            token = int(torch.argmax(logits))
        else:
            # from the largest logit down, so that a tiny temperature cannot overflow to inf (and
            # softmax to NaN): the others go to -inf, the largest stays 0, as greedy would choose
            scaled = (logits - logits.max()) / (req.temperature if req.temperature is not None else 1.0)
            probs = torch.softmax(scaled, dim=-1)
            if req.top_p is not None and req.top_p < 1.0:
                probs = _top_p(probs, req.top_p)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token in eos:
            finish = "stop"
            break
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = _first_stop(text, req.stop)
        if cut is not None:
            text = text[:cut]
            finish = "stop"
        visible = len(text) if cut is not None else _stable(text, req.stop)
        info = None
        if req.logprobs:
            info = _token_logprob(tokenizer, token, float(logp[token]))
            if req.top_logprobs:
                top = torch.topk(logp, req.top_logprobs)
                info["top_logprobs"] = [
                    _token_logprob(tokenizer, int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)
                ]
            else:
                info["top_logprobs"] = []
        handle.emit(Token(choice, token, text[shown:visible], info))
        shown = max(shown, visible)
        if cut is not None:
            break
        step_input = torch.tensor([[token]], device=prompt.device)
    if shown < len(text):
        handle.emit(Token(choice, -1, text[shown:], None))  # what was held back for a stop string
    return ChoiceEnd(choice, finish, text, ids)


MIN_TEMPERATURE = 1e-5


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _top_p(probs: Any, top_p: float) -> Any:
    import torch

    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
    keep[0] = True  # the most likely token always stays (top_p 0 would keep none: NaN)
    filtered = torch.zeros_like(probs)
    filtered[order[keep]] = sorted_probs[keep]
    return filtered / filtered.sum()


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _stable(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be shown: not a trailing partial character, nor a tail that may
    be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end
