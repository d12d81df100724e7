"""Generation with base models and fine-tuned adapters, on one engine thread, batched.

An ``Engine`` owns its models on a thread of its own: callers ``submit`` a ``GenRequest`` and get a
``Handle`` whose events (tokens, choice ends, usage) they read from any thread or from an asyncio
loop; a request that finds the queue full is refused at once (``EngineBusy``, HTTP 429), and a
caller that goes away ``cancel``s its handle, which ends its generation at the next step. No lock
is ever held across a caller's generator, so a web server's dropped client cannot wedge it.

Requests are batched at every step (continuous batching, ``batching``): each model has a running
batch that sequences join once their prompt is read (a chunk of it per step, so a long prompt
never stalls the others for long) and leave when they end, and one forward pass gives every
running sequence its next token, whichever adapter of that base model (or the base itself) it
uses. Sequences are taken first come, first served, as the KV cache's budget leaves room; a
request that could never fit it is refused (HTTP 400). Label-constrained requests (``choices``,
``label_choice``) are answered whole between two steps: a few forward passes of one prompt.

Each base model is loaded once; adapters are attached to it by a name made of their directory and
the adapter file's size and modification time, so a checkpoint saved again under the same path is
loaded afresh, never served from a stale copy, and a model whose directory is gone is detached
once nothing running uses it. Past ``max_adapters`` the least recently used idle adapter goes.

Decoding is our own loop over the model's forward pass (transformers' continuous-batching manager
is discussed in ``batching``): it needs the raw log-probabilities of every token as it is
streamed (OpenAI's ``logprobs``), a check for cancellation between tokens, a per-request random
generator (``seed`` without touching torch's global one), and stop strings cut out of the text.
Greedy decoding equals ``generate``'s, alone and batched (tested).
"""

from __future__ import annotations

import asyncio
import collections
import functools
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
DEFAULT_MAX_BATCH = 16  # sequences one step decodes, per model (bench/README.md, "Serving many clients")
DEFAULT_MAX_ADAPTERS = 8  # adapters kept loaded on one base model
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


@dataclass
class _Running:
    """A request the engine took from its queue: how many of its answers are still going."""

    handle: Handle
    open: int  # sequences not yet ended
    prompt_tokens: int
    completion_tokens: int = 0
    started: bool = False  # one of its sequences has been given room


class _Group:
    """The running batch of one model: a base model with its adapters, or a fully fine-tuned
    model. Sequences wait in ``waiting`` for room, are prefilled one at a time, then decode
    together, one token each per step."""

    def __init__(self, entry: list[Any]) -> None:
        self.entry = entry  # [model, tokenizer, {adapter name: dir}]: model may become a PeftModel
        self.cache: Any = None  # batching.SlotCache, made at the first prefill
        self.plain = True  # whether the model's cache fits the slot layout (else: one at a time)
        self.running: list[Any] = []  # batching.Sequence; row i of the cache is running[i]
        self.waiting: collections.deque[Any] = collections.deque()
        self.prefilling: Any = None
        self.bytes_per_token = 0
        self.end_tokens: set[int] | None = None

    @property
    def model(self) -> Any:
        return self.entry[0]

    @property
    def tokenizer(self) -> Any:
        return self.entry[1]

    def idle(self) -> bool:
        return not (self.running or self.waiting or self.prefilling)

    def sequences(self) -> list[Any]:
        return [*self.running, *self.waiting, *([self.prefilling] if self.prefilling else [])]

    def reserved(self, extra: Any = None) -> tuple[int, int]:
        """(rows, width) the running and prefilling sequences (and ``extra``) may need."""
        seqs = [*self.running, *([self.prefilling] if self.prefilling else []), *([extra] if extra else [])]
        return len(seqs), max((s.final_length for s in seqs), default=0)

    def allocated_bytes(self) -> int:
        rows, width = self.cache.shape if self.cache is not None else (0, 0)
        return rows * width * self.bytes_per_token


class Engine:
    def __init__(
        self,
        home: Home,
        local_base_model: str | None = None,
        *,
        max_queue: int = DEFAULT_QUEUE,
        max_batch: int | None = None,
        kv_cache_gb: float | None = None,
        max_adapters: int | None = None,
        dtype: str | None = None,
    ) -> None:
        self.home = home
        self.dtype_choice = dtype  # inference_dtype: auto (None), float32 or bfloat16 (local/device.py)
        self.local_base_model = local_base_model
        self.max_queue = max_queue
        self.max_batch = max_batch or DEFAULT_MAX_BATCH
        self.max_adapters = max_adapters or DEFAULT_MAX_ADAPTERS
        self._kv_cache_gb = kv_cache_gb
        self._budget: Any = None
        self._bases: dict[str, list[Any]] = {}  # base name -> [model, tokenizer, {adapter name: dir}]
        self._full: dict[str, list[Any]] = {}  # a fully fine-tuned model's key -> [model, tokenizer, {}]
        self._groups: dict[int, _Group] = {}  # id(entry) -> its running batch
        self._used: collections.OrderedDict[str, None] = collections.OrderedDict()  # adapters, least recent first
        # waiting requests; a cancelled one gives its place up at once (not when the thread reaches it)
        self._waiting: collections.deque[Handle] = collections.deque()
        self._queued_inside = 0  # taken by the engine thread, waiting for room in a batch
        self._running = 0
        self.peak_batch = 0  # the most sequences one step has decoded (for /health and tests)
        self.peak_kv_bytes = 0  # the most KV cache memory allocated at once
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def budget(self) -> Any:
        """The KV cache's budget (``batching.KVBudget``), read once from what the machine has."""
        if self._budget is None:
            from .machine import kv_budget

            self._budget = kv_budget(self._kv_cache_gb)
        return self._budget

    @property
    def dtype(self) -> str:
        """The dtype base models are loaded in: ``inference_dtype`` resolved for this device."""
        from .device import facts, inference_dtype

        return inference_dtype(facts(), self.dtype_choice)

    def describe(self) -> str:
        """How the engine schedules, for the server's first lines."""
        from .device import describe_inference, facts

        return (
            f"continuous batching of up to {self.max_batch} sequences per model, KV cache budget "
            f"{self.budget.describe()}, up to {self.max_adapters} adapters loaded, {self.max_queue} requests may wait; "
            f"{describe_inference(facts(), self.dtype)}"
        )

    # ---- the caller's side --------------------------------------------------------------------
    def submit(self, request: GenRequest) -> Handle:
        handle = Handle(request)
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="gpt-finetune-engine", daemon=True)
                self._thread.start()
        with self._cond:
            self._drop_cancelled()
            if len(self._waiting) + self._queued_inside >= self.max_queue:
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
        """Requests waiting for the engine: in its queue, or taken and waiting for room."""
        with self._cond:
            self._drop_cancelled()
            return len(self._waiting) + self._queued_inside

    def running(self) -> int:
        """Requests being answered."""
        with self._cond:
            return self._running

    def run(self, request: GenRequest) -> list[ChoiceEnd | Usage]:
        """Submit and wait: the ``ChoiceEnd`` of each choice (in choice order), then ``Usage``."""
        out: list[ChoiceEnd | Usage] = []
        for item in self.submit(request).events():
            if isinstance(item, Failed):
                raise item.error
            if isinstance(item, (ChoiceEnd, Usage)):
                out.append(item)
        return sorted(out, key=lambda e: (isinstance(e, Usage), getattr(e, "choice", 0)))

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
                while not self._waiting and all(g.idle() for g in self._groups.values()):
                    self._cond.wait()
            self._take()
            for key, group in list(self._groups.items()):
                try:
                    self._iterate(group)
                except BaseException as exc:  # the batch's requests are told; the engine keeps serving
                    if not isinstance(exc, GptFinetuneError):
                        log.exception("generation failed")
                    self._fail_group(group, exc)
                if group.idle():
                    if group.cache is not None:
                        group.cache.release()
                    del self._groups[key]

    def _take(self) -> None:
        """Take requests from the queue, in order, while no sequence waits for room (first come,
        first served). A label-constrained request is answered whole here: one per step."""
        while not any(g.waiting for g in self._groups.values()):
            with self._cond:
                self._drop_cancelled()
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            try:
                if self._start(handle):
                    return
            except BaseException as exc:  # reported to the caller; the engine keeps serving
                if not isinstance(exc, GptFinetuneError):
                    log.exception("generation failed")
                handle.emit(Failed(exc))

    def _start(self, handle: Handle) -> bool:
        """Answer a constrained request whole (True), or queue a request's sequences in its
        model's batch (False)."""
        import torch

        from .batching import Sequence

        req = handle.request
        entry, name = self._load(req.base, req.adapter)
        model, tokenizer = entry[0], entry[1]
        max_new = req.max_tokens or DEFAULT_MAX_TOKENS
        context = _context_length(model)
        if max_new > context:  # as OpenAI: never more new tokens than the model can attend to
            raise BackendError(
                f"max_tokens is too large: {max_new}. This model supports at most {context} completion tokens",
                param="max_tokens",
                code="invalid_value",
            )
        if req.choices or req.label_choice:
            with torch.inference_mode(), self._adapter_context(entry, name):
                if req.choices:
                    self._choose(handle, model, tokenizer)
                else:
                    self._choose_labels(handle, model, tokenizer)
            return True
        prompt = self._inputs(tokenizer, req.messages, model.device, self._prompt_limit(model, req.adapter, max_new))[
            "input_ids"
        ]
        group = self._groups.setdefault(id(entry), _Group(entry))
        if not group.bytes_per_token:
            from .batching import kv_bytes_per_token

            group.bytes_per_token = kv_bytes_per_token(model.config, model.dtype)
        need = (int(prompt.shape[1]) + max_new) * group.bytes_per_token
        if need > self.budget.bytes:
            raise BackendError(
                f"this request can never fit the engine's KV cache: its prompt and max_tokens need "
                f"{need / 1e9:.2f} GB of the {self.budget.describe()}",
                param="max_tokens",
                code="context_length_exceeded",
                hint="send a shorter prompt or a smaller max_tokens, or start the server with a larger --kv-cache-gb",
            )
        running = _Running(handle, req.n, int(prompt.shape[1]))
        for choice in range(req.n):
            generator = torch.Generator(device=model.device)
            if req.seed is not None:  # each choice its own stream: the same whatever runs beside it
                generator.manual_seed(req.seed if choice == 0 else hash((req.seed, choice)) & (2**63 - 1))
            else:
                generator.seed()
            group.waiting.append(Sequence(running, choice, prompt, max_new, name, generator))
        with self._cond:
            self._queued_inside += 1
        return False

    def _load(self, base_name: str, adapter: str | None) -> tuple[list[Any], str | None]:
        """(the model's entry [model, tokenizer, attached adapters], the PEFT adapter name its
        rows use, None for the base model or a fully fine-tuned one). Engine thread only."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if base_name not in self._bases:
            base = resolve_base(base_name, self.local_base_model)
            path = model_dir(base, self.home)
            dtype = getattr(torch, self.dtype)
            model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            if torch.cuda.is_available():
                model = model.to("cuda")
            model.eval()
            self._bases[base_name] = [model, AutoTokenizer.from_pretrained(path), {}]
        entry = self._bases[base_name]
        self._detach_gone(entry)
        if adapter is None:
            return entry, None
        if (Path(adapter) / "adapter_config.json").is_file():
            from peft import PeftModel

            name = _adapter_name(Path(adapter))
            attached = entry[2]
            if name not in attached:
                self._evict(entry)
                if not hasattr(entry[0], "peft_config"):  # the first adapter makes the base a PeftModel
                    entry[0] = PeftModel.from_pretrained(entry[0], adapter, adapter_name=name)
                    entry[0].eval()
                else:
                    entry[0].load_adapter(adapter, adapter_name=name)
                attached[name] = adapter
            self._used.pop(name, None)
            self._used[name] = None  # the most recently used
            return entry, name
        # a fully fine-tuned model: its own weights (a newer save is a new entry; the old one
        # finishes what it runs, then goes)
        key = f"{adapter}@{_stamp(Path(adapter) / 'model.safetensors')}"
        if key not in self._full:
            for old in [k for k in self._full if k.split("@")[0] == adapter]:
                del self._full[old]
            model = entry[0]
            full = AutoModelForCausalLM.from_pretrained(adapter, dtype=model.dtype).to(model.device).eval()
            self._full[key] = [full, AutoTokenizer.from_pretrained(adapter), {}]
        return self._full[key], None

    def _in_use(self) -> set[str]:
        return {s.adapter for g in self._groups.values() for s in g.sequences() if s.adapter is not None}

    def _drop_adapter(self, entry: list[Any], name: str) -> None:
        from . import mixed_lora

        del entry[2][name]
        self._used.pop(name, None)
        if len(getattr(entry[0], "peft_config", {})) > 1:
            mixed_lora.forget(entry[0])  # its stacked copies go with it
            entry[0].delete_adapter(name)
        else:  # the last adapter: back to the plain base model
            entry[0] = entry[0].unload()

    def _evict(self, entry: list[Any]) -> None:
        """Make room for one more adapter: the least recently used ones no sequence uses go."""
        busy = self._in_use()
        for name in list(self._used):
            if len(entry[2]) < self.max_adapters:
                return
            if name in entry[2] and name not in busy:
                self._drop_adapter(entry, name)

    def _detach_gone(self, entry: list[Any]) -> None:
        """Forget adapters whose files were deleted or saved again (their name changes), once no
        running sequence uses them: a model deleted mid-answer finishes that answer."""
        busy = self._in_use()
        for name, directory in list(entry[2].items()):
            if _adapter_name(Path(directory)) != name and name not in busy:
                self._drop_adapter(entry, name)

    def _adapter_context(self, entry: list[Any], name: str | None) -> Any:
        """For a request answered whole (constrained): the model as its adapter (or the base) sees it."""
        from contextlib import nullcontext

        model = entry[0]
        if not hasattr(model, "peft_config"):
            return nullcontext()
        if name is None:
            return model.disable_adapter()
        if model.active_adapter != name:  # set_adapter walks every LoRA layer: not every step
            model.set_adapter(name)
        return nullcontext()

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

    # ---- a batch's step -----------------------------------------------------------------------
    def _iterate(self, group: _Group) -> None:
        """One step of a model's batch: a chunk of the prompt being read, then one token for
        every running sequence."""
        import torch

        with torch.inference_mode():
            for seq in [s for s in group.sequences() if s.request.handle.cancelled.is_set()]:
                self._end(group, seq, "stop")
            if group.prefilling is None and group.waiting and len(group.running) < self.max_batch:
                if self._room(group, group.waiting[0]):
                    self._begin_prefill(group, group.waiting.popleft())
            if group.prefilling is not None:
                self._prefill_step(group)
            if group.running:
                self._decode_step(group)

    def _room(self, group: _Group, seq: Any) -> bool:
        """Whether ``seq`` fits beside everything running: the cache's rows x width over every
        batch stays within the budget."""
        rows, width = group.reserved(seq)
        others = sum(g.allocated_bytes() for g in self._groups.values() if g is not group)
        have_rows, have_width = group.cache.shape if group.cache is not None else (0, 0)
        mine = max(rows, have_rows) * max(width, have_width) * group.bytes_per_token
        return others + mine <= self.budget.bytes

    def _begin_prefill(self, group: _Group, seq: Any) -> None:
        from transformers import DynamicCache

        from .batching import Prefill

        seq.prefill = Prefill(DynamicCache(config=group.model.config))
        group.prefilling = seq
        if not seq.request.started:
            seq.request.started = True
            with self._cond:
                self._queued_inside -= 1
                self._running += 1

    def _forward(self, group: _Group, adapters: list[str | None], **kw: Any) -> Any:
        model = group.model
        if not hasattr(model, "peft_config"):
            return model(use_cache=True, logits_to_keep=1, **kw)
        from . import mixed_lora

        # Rows on several models, or all on the base model: two dense matmuls a layer
        # (local/mixed_lora.py), with none at all for base rows. For an all-base step that also
        # spares PEFT's disable_adapter, which walks every LoRA layer twice a step (measured
        # slower than an adapter's step: bench/README.md, "Mixed adapters in one decoding step").
        if (len(set(adapters)) > 1 or adapters[0] is None) and mixed_lora.supported(model):
            with mixed_lora.mixed_rows(model, adapters):
                return model(use_cache=True, logits_to_keep=1, **kw)
        if len(set(adapters)) > 1:
            # other adapter kinds: rows name their adapters to PEFT; the base model's is __base__
            kw["adapter_names"] = [a if a is not None else "__base__" for a in adapters]
            return model(use_cache=True, logits_to_keep=1, **kw)
        # One adapter for every row (always so for a prompt chunk): PEFT's plain path, without the
        # per-adapter gather and scatter of its mixed batches in every layer (bench/README.md).
        with self._adapter_context([model], adapters[0]):
            return model(use_cache=True, logits_to_keep=1, **kw)

    def _prefill_step(self, group: _Group) -> None:
        from .batching import PREFILL_CHUNK, plain_attention

        seq = group.prefilling
        p = seq.prefill
        chunk = seq.prompt[:, p.done : p.done + PREFILL_CHUNK]
        out = self._forward(group, [seq.adapter], input_ids=chunk, **{_cache_arg(group.model): p.cache})
        p.done += int(chunk.shape[1])
        if p.done < seq.prompt.shape[1]:
            return
        group.prefilling = None
        logits = out.logits[0, -1].float()
        if not group.running and group.cache is None:
            group.plain = plain_attention(p.cache)
        # the request's other choices share this prompt: they join now, from the same cache
        siblings = [s for s in group.waiting if s.request is seq.request]
        try:
            self._join(group, seq, p.cache, logits, share=bool(siblings))
        except BaseException:
            # while it joins the sequence is in none of the group's lists: put it back, so the
            # batch's failure reaches its caller instead of leaving it waiting for ever
            if seq not in group.running:
                group.waiting.appendleft(seq)
            raise
        for sib in siblings:  # a sibling failing to join fails with seq's request, now running
            if len(group.running) >= self.max_batch or not self._room(group, sib):
                break
            group.waiting.remove(sib)
            self._join(group, sib, p.cache, logits, share=True)

    def _join(self, group: _Group, seq: Any, prefilled: Any, logits: Any, *, share: bool) -> None:
        """A prefilled sequence takes the next row (or keeps its own cache) and its first token."""
        import copy

        from .batching import SlotCache

        seq.length = int(seq.prompt.shape[1])
        seq.prefill = None
        if group.plain:
            if group.cache is None:
                group.cache = SlotCache(len(prefilled.layers))
            rows, width = group.reserved(seq)
            have_rows, have_width = group.cache.shape
            if rows > have_rows or width > have_width:
                # grow by doubling where the budget allows it (fewer copies), else to what is needed
                grown = (min(self.max_batch, max(rows, 2 * have_rows)), max(width, have_width))
                others = sum(g.allocated_bytes() for g in self._groups.values() if g is not group)
                if others + grown[0] * grown[1] * group.bytes_per_token > self.budget.bytes:
                    grown = (rows, max(width, have_width))
                group.cache.reserve(*grown, like=prefilled)
            group.cache.put(len(group.running), prefilled, seq.length)
        else:
            seq.own_cache = copy.deepcopy(prefilled) if share else prefilled
        group.running.append(seq)
        self._accept(group, seq, logits)
        if seq.finish is not None:
            self._end(group, seq, seq.finish)

    def _decode_step(self, group: _Group) -> None:
        import torch

        rows = list(group.running)
        model = group.model
        if group.plain:
            cache = group.cache
            device = model.device
            positions = torch.tensor([s.length for s in rows], device=device)
            cache.positions = positions
            cache.width = int(positions.max()) + 1
            visible = torch.arange(cache.width, device=device)[None, :] <= positions[:, None]
            mask = torch.zeros(visible.shape, dtype=model.dtype, device=device)
            mask.masked_fill_(~visible, torch.finfo(model.dtype).min)
            out = self._forward(
                group,
                [s.adapter for s in rows],
                input_ids=torch.tensor([[s.next_token] for s in rows], device=device),
                position_ids=positions[:, None],
                attention_mask=mask[:, None, None, :],
                **{_cache_arg(model): cache},
            )
            logits = out.logits[:, -1].float()
        else:
            outs = [
                self._forward(
                    group,
                    [s.adapter],
                    input_ids=torch.tensor([[s.next_token]], device=model.device),
                    **{_cache_arg(model): s.own_cache},
                ).logits[0, -1]
                for s in rows
            ]
            logits = torch.stack(outs).float()
        self.peak_batch = max(self.peak_batch, len(rows))
        self.peak_kv_bytes = max(self.peak_kv_bytes, sum(g.allocated_bytes() for g in self._groups.values()))
        for i, seq in enumerate(rows):
            seq.length += 1
            self._accept(group, seq, logits[i])
        for seq in rows:
            if seq.finish is not None:
                self._end(group, seq, seq.finish)

    def _accept(self, group: _Group, seq: Any, logits: Any) -> None:
        """The sequence's next token from these logits: chosen, checked for its end and stop
        strings, and emitted with its log-probabilities when asked."""
        import torch

        req = seq.request.handle.request
        tokenizer = group.tokenizer
        logp = torch.log_softmax(logits, dim=-1)
        # a temperature under float32's reach (5e-324 is 0.0 there: 0/0 is NaN) samples the top
        # token anyway: below MIN_TEMPERATURE the answer is greedy
        if req.temperature is not None and req.temperature < MIN_TEMPERATURE:
            token = int(torch.argmax(logits))
        else:
            # from the largest logit down, so that a tiny temperature cannot overflow to inf (and
            # softmax to NaN): the others go to -inf, the largest stays 0, as greedy would choose
            scaled = (logits - logits.max()) / (req.temperature if req.temperature is not None else 1.0)
            probs = torch.softmax(scaled, dim=-1)
            if req.top_p is not None and req.top_p < 1.0:
                probs = _top_p(probs, req.top_p)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        if token in _end_tokens(group):
            seq.finish = "stop"
            return
        seq.ids.append(token)
        text = tokenizer.decode(seq.ids, skip_special_tokens=True)
        cut = _first_stop(text, req.stop)
        if cut is not None:
            text = text[:cut]
        seq.text = text
        visible = len(text) if cut is not None else _stable(text, req.stop)
        info = None
        if req.logprobs:
            info = _token_logprob(tokenizer, token, float(logp[token]))
            info["top_logprobs"] = []
            if req.top_logprobs:
                top = torch.topk(logp, req.top_logprobs)
                info["top_logprobs"] = [
                    _token_logprob(tokenizer, int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)
                ]
        seq.request.handle.emit(Token(seq.choice, token, text[seq.shown : visible], info))
        seq.shown = max(seq.shown, visible)
        if cut is not None:
            seq.finish = "stop"
        elif len(seq.ids) >= seq.max_new:
            seq.finish = "length"
        else:
            seq.next_token = token

    def _end(self, group: _Group, seq: Any, finish: str) -> None:
        """A sequence is done: its row goes to the batch's last sequence, its answer to its caller."""
        if seq in group.running:
            i, last = group.running.index(seq), len(group.running) - 1
            if i != last:
                if group.plain:
                    group.cache.move(last, i, group.running[last].length)
                group.running[i] = group.running[last]
            group.running.pop()
        elif seq is group.prefilling:
            group.prefilling = None
        elif seq in group.waiting:
            group.waiting.remove(seq)
        seq.own_cache = seq.prefill = None
        running = seq.request
        handle = running.handle
        if seq.shown < len(seq.text):
            handle.emit(Token(seq.choice, -1, seq.text[seq.shown :], None))  # held back for a stop string
        handle.emit(ChoiceEnd(seq.choice, finish, seq.text, seq.ids))
        running.completion_tokens += len(seq.ids)
        running.open -= 1
        if running.open == 0:
            handle.emit(Usage(running.prompt_tokens, running.completion_tokens))
            self._retire(running)

    def _retire(self, running: _Running) -> None:
        """A request is done (answered or failed): it no longer counts as running or waiting."""
        with self._cond:
            if running.started:
                self._running -= 1
            else:
                self._queued_inside -= 1

    def _fail_group(self, group: _Group, exc: BaseException) -> None:
        """A step failed: every request of the batch gets the error, once."""
        told: set[int] = set()
        for seq in group.sequences():
            running = seq.request
            if id(running) not in told:
                told.add(id(running))
                running.handle.emit(Failed(exc))
                self._retire(running)
        group.running, group.waiting, group.prefilling = [], collections.deque(), None

    def _choose_labels(self, handle: Handle, model: Any, tokenizer: Any) -> None:
        """Label by label: the subset of the labels the model scores highest, one label at a time."""
        from ..data.labels import format_labels
        from .scoring import choose_labels

        req = handle.request
        assert req.label_choice is not None
        choice = req.label_choice
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

    def _choose(self, handle: Handle, model: Any, tokenizer: Any) -> None:
        """Label-constrained: the choice the model scores highest, as it was trained to write it."""
        from .scoring import score_choices

        req = handle.request
        choices = list(req.choices or [])
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


def _cache_arg(model: Any) -> str:
    """transformers 5 names the KV cache ``cache`` (``past_key_values`` before, still for some models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls: Any = type(base)
    return _cache_arg_of(cls)


@functools.cache
def _cache_arg_of(cls: Any) -> str:  # a signature read once per model class, not every step
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _end_tokens(group: Any) -> set[int]:
    """The tokens that end an answer: the tokenizer's end and the model's generation config's
    (read at the batch's first token; neither changes while it runs)."""
    if group.end_tokens is None:
        tokenizer, model = group.tokenizer, group.model
        eos = {int(t) for t in ([tokenizer.eos_token_id] if isinstance(tokenizer.eos_token_id, int) else [])}
        group.end_tokens = eos | {int(t) for t in _as_list(getattr(model.generation_config, "eos_token_id", None))}
    return group.end_tokens


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
