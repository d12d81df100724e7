"""Chat completions: an OpenAI chat-completion request in, OpenAI's ``ChatCompletion`` or its
chunks out. The local backend, the server and evaluation all call this.

The request is checked here, once, field by field: what the engine supports is used; the neutral
values that clients always send (``n=1``, ``presence_penalty=0``, ``logit_bias={}`` as LangChain
and others do) are accepted; anything else the engine cannot honour (tools, penalties, JSON mode,
audio, ...) is refused with a 400 that names the field, never silently ignored.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..errors import BackendError, GptFinetuneError
from .models import ModelService

ROLES = ("system", "developer", "user", "assistant")
MAX_N = 8
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
SUPPORTED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "guided_choice",  # extension (as vLLM's): answer with the most likely of these strings
}
MAX_CHOICES = 256
# fields accepted only with the value that changes nothing
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "user": lambda v: v is None or isinstance(v, str),
    "safety_identifier": lambda v: v is None or isinstance(v, str),
    "prompt_cache_key": lambda v: v is None or isinstance(v, str),
    "metadata": lambda v: v is None or isinstance(v, dict),
    "store": lambda v: v in (None, False),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v in (None, ["text"]),
}


def bad(message: str, param: str, code: str = "invalid_value") -> BackendError:
    return BackendError(message, param=param, code=code)


def _int(req: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{key} must be an integer, got {value!r}", key, "invalid_type")
    if value < lo or (hi is not None and value > hi):
        raise bad(f"{key} must be from {lo}" + (f" to {hi}" if hi is not None else " up") + f", got {value}", key)
    return value


def _float(req: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{key} must be a number, got {value!r}", key, "invalid_type")
    if not lo <= value <= hi:
        raise bad(f"{key} must be from {lo:g} to {hi:g}, got {value}", key)
    return float(value)


def _bool(req: dict[str, Any], key: str) -> bool:
    value = req.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{key} must be true or false, got {value!r}", key, "invalid_type")
    return bool(value)


MAX_MESSAGES = 2048  # more cannot fit any local model's context (each message costs template tokens)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty array", "messages", "invalid_type")
    if len(value) > MAX_MESSAGES:
        raise bad(f"messages holds {len(value):,} messages; at most {MAX_MESSAGES:,} are accepted", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(
                f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}"
                + (" (tools are not supported)" if role in ("tool", "function") else ""),
                f"{where}.role",
            )
        for key in m:
            if key in ("role", "content", "name"):
                continue
            if key in ("tool_calls", "function_call", "audio", "refusal") and m[key] in (None, []):
                continue
            raise bad(f"{where}.{key} is not supported", f"{where}.{key}", "unsupported_parameter")
        if "name" in m and not isinstance(m["name"], str):
            raise bad(f"{where}.name must be a string", f"{where}.name", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad("only text content parts are supported", f"{where}.content[{j}]", "unsupported_parameter")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or text parts", f"{where}.content", "invalid_type")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: not text a tokenizer can read
            raise bad(
                f"{where}.content is not valid text (a lone surrogate)", f"{where}.content", "invalid_value"
            ) from None
        # the chat templates know no "developer": it is the system message of newer models
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_request(req: Any) -> dict[str, Any]:
    """The checked request, as the engine takes it (plus ``model``, ``stream``, ``include_usage``)."""
    if not isinstance(req, dict):
        raise bad("the request body must be a JSON object", "body", "invalid_type")
    for key, value in req.items():
        if key in SUPPORTED:
            continue
        if key in NEUTRAL:
            if not NEUTRAL[key](value):
                raise bad(f"{key}={value!r} is not supported by this server", key, "unsupported_value")
            continue
        raise bad(f"unknown or unsupported field: {key}", key, "unsupported_parameter")
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must be a model id", "model", "invalid_type")
    max_tokens = _int(req, "max_tokens", 1)
    max_completion = _int(req, "max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise bad("give max_completion_tokens or max_tokens, not both", "max_tokens")
    stop = req.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stops = list(stop)
    else:
        raise bad(f"stop must be a string or up to {MAX_STOP} strings", "stop", "invalid_type")
    logprobs = _bool(req, "logprobs")
    top = _int(req, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise bad("top_logprobs needs logprobs=true", "top_logprobs")
    stream = _bool(req, "stream")
    options = req.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise bad("stream_options supports include_usage only", "stream_options", "unsupported_parameter")
        if options.get("include_obfuscation"):
            raise bad("include_obfuscation is not supported", "stream_options.include_obfuscation", "unsupported_value")
    choices = req.get("guided_choice")
    if choices is not None:
        if (
            not isinstance(choices, list)
            or not 1 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise bad(f"guided_choice must be 1 to {MAX_CHOICES} non-empty strings", "guided_choice", "invalid_type")
        for key in ("logprobs", "stop"):
            if req.get(key):
                raise bad(f"{key} cannot be combined with guided_choice", key, "unsupported_value")
        if (req.get("n") or 1) > 1:
            raise bad("guided_choice gives one answer: n must be 1", "n", "unsupported_value")
    return {
        "model": model,
        "choices": list(choices) if choices else None,
        "messages": _messages(req.get("messages")),
        "max_tokens": max_completion or max_tokens,
        "temperature": _float(req, "temperature", 0, 2),
        "top_p": _float(req, "top_p", 0, 1),
        "stop": stops,
        "seed": _int(req, "seed", -(2**63), 2**63 - 1),
        "n": _int(req, "n", 1, MAX_N) or 1,
        "logprobs": logprobs,
        "top_logprobs": top,
        "stream": stream,
        "include_usage": bool((options or {}).get("include_usage")),
    }


class ChatRun:
    """A request on its way through the engine: read it whole or as chunks, from threads or
    asyncio. ``cancel`` frees its place in the engine (a client that went away)."""

    def __init__(self, handle: Any, parsed: dict[str, Any], model: str) -> None:
        self.handle = handle
        self.parsed = parsed
        self.model = model
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.stream = parsed["stream"]
        self._choices: dict[int, dict[str, Any]] = {}
        self._logprobs: dict[int, list[dict[str, Any]]] = {}
        self._started: set[int] = set()

    def cancel(self) -> None:
        self.handle.cancel()

    # ---- whole ------------------------------------------------------------------------------
    def completion(self) -> dict[str, Any]:
        for event in self.handle.events():
            done = self._collect(event)
            if done is not None:
                return done
        raise RuntimeError("the engine ended without an answer")  # pragma: no cover

    async def acompletion(self) -> dict[str, Any]:
        try:
            async for event in self.handle.aevents():
                done = self._collect(event)
                if done is not None:
                    return done
        finally:
            self.cancel()  # a no-op when finished; frees the engine when the caller went away
        raise RuntimeError("the engine ended without an answer")  # pragma: no cover

    def _collect(self, event: Any) -> dict[str, Any] | None:
        from ..local.inference import ChoiceEnd, Failed, Token, Usage

        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Token) and event.logprob is not None:
            self._logprobs.setdefault(event.choice, []).append(event.logprob)
        elif isinstance(event, ChoiceEnd):
            self._choices[event.choice] = {
                "index": event.choice,
                "message": {"role": "assistant", "content": event.text, "refusal": None},
                "logprobs": {"content": self._logprobs.get(event.choice, []), "refusal": None}
                if self.parsed["logprobs"]
                else None,
                "finish_reason": event.finish_reason,
            }
        elif isinstance(event, Usage):
            return self.whole([self._choices[i] for i in sorted(self._choices)], _usage(event))
        return None

    def whole(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        """OpenAI's ``ChatCompletion``."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    # ---- chunks -----------------------------------------------------------------------------
    def chunks(self) -> Iterator[dict[str, Any]]:
        try:
            for event in self.handle.events():
                yield from self._chunks(event)
        finally:
            self.cancel()

    async def achunks(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for event in self.handle.aevents():
                for chunk in self._chunks(event):
                    yield chunk
        finally:
            self.cancel()

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.parsed["include_usage"]:
            chunk["usage"] = usage
        return chunk

    def _chunks(self, event: Any) -> list[dict[str, Any]]:
        from ..local.inference import ChoiceEnd, Failed, Token, Usage

        if isinstance(event, Failed):
            raise event.error
        out = []
        if isinstance(event, (Token, ChoiceEnd)) and event.choice not in self._started:
            self._started.add(event.choice)
            out.append(
                self._chunk(
                    [
                        {
                            "index": event.choice,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        if isinstance(event, Token) and (event.text or event.logprob is not None):
            logprobs = {"content": [event.logprob], "refusal": None} if event.logprob is not None else None
            out.append(
                self._chunk(
                    [
                        {
                            "index": event.choice,
                            "delta": {"content": event.text},
                            "logprobs": logprobs,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        elif isinstance(event, ChoiceEnd):
            out.append(
                self._chunk(
                    [{"index": event.choice, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}]
                )
            )
        elif isinstance(event, Usage) and self.parsed["include_usage"]:
            out.append(self._chunk([], _usage(event)))
        return out


def _usage(event: Any) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


class ChatService:
    def __init__(self, models: ModelService, engine_factory: Callable[[], Any]) -> None:
        self.models = models
        self._engine_factory = engine_factory
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = self._engine_factory()
        return self._engine

    def pending(self) -> int:
        """Requests waiting for the engine (0 before the first one loads it)."""
        return self._engine.pending() if self._engine is not None else 0

    def start(self, request: Any) -> ChatRun:
        """Check the request, find the model, and queue it on the engine (``EngineBusy`` when
        the queue is full)."""
        from ..local.inference import GenRequest

        parsed = parse_request(request)
        base, adapter = self.models.locate(parsed["model"])
        handle = self.engine.submit(
            GenRequest(
                base,
                adapter,
                parsed["messages"],
                max_tokens=parsed["max_tokens"],
                temperature=parsed["temperature"],
                top_p=parsed["top_p"],
                stop=parsed["stop"],
                seed=parsed["seed"],
                n=parsed["n"],
                logprobs=parsed["logprobs"],
                top_logprobs=parsed["top_logprobs"],
                choices=parsed["choices"],
            )
        )
        return ChatRun(handle, parsed, parsed["model"])

    def create_many(self, requests: list[Any], *, batch_size: int = 8) -> list[dict[str, Any] | GptFinetuneError]:
        """Several requests (a batch file): each answer, or the error that refused it. Greedy
        requests for the same model and length that ask for nothing else are answered
        ``batch_size`` at a time (batched generation); the others one by one."""
        from ..local.inference import ChoiceEnd, GenRequest, Usage

        out: list[dict[str, Any] | GptFinetuneError | None] = [None] * len(requests)
        groups: dict[tuple[str, int | None], list[tuple[int, dict[str, Any]]]] = {}
        for i, request in enumerate(requests):
            try:
                parsed = parse_request(request)
            except GptFinetuneError as exc:
                out[i] = exc
                continue
            plain = (
                parsed["temperature"] == 0
                and parsed["n"] == 1
                and not (parsed["stop"] or parsed["logprobs"] or parsed["stream"] or parsed["choices"])
            )
            if plain:
                groups.setdefault((parsed["model"], parsed["max_tokens"]), []).append((i, parsed))
            else:
                try:
                    out[i] = self.start(request).completion()
                except GptFinetuneError as exc:
                    out[i] = exc
        for (model, max_tokens), items in groups.items():
            # prompts of similar length batched together: left padding to the longest of a batch
            # is wasted work (on real issues, batches in file order ran slower than single prompts)
            items.sort(key=lambda item: sum(len(m["content"]) for m in item[1]["messages"]))
            try:
                base, adapter = self.models.locate(model)
            except GptFinetuneError as exc:
                for i, _ in items:
                    out[i] = exc
                continue
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                request = GenRequest(
                    base, adapter, [], max_tokens=max_tokens, temperature=0, batch=[p["messages"] for _, p in chunk]
                )
                try:
                    ends = [e for e in self.engine.run(request) if isinstance(e, ChoiceEnd)]
                except GptFinetuneError as exc:
                    for i, _ in chunk:
                        out[i] = exc
                    continue
                for (i, parsed), end in zip(chunk, ends, strict=True):
                    message = {"role": "assistant", "content": end.text, "refusal": None}
                    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": end.finish_reason}
                    out[i] = ChatRun(None, parsed, model).whole(
                        [choice], _usage(Usage(end.prompt_tokens, len(end.token_ids)))
                    )
        assert all(x is not None for x in out)  # every request got its answer or its error
        return [x for x in out if x is not None]

    def create(self, request: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """The whole completion, or (``stream``) an iterator of chunks."""
        run = self.start(request)
        return run.chunks() if run.stream else run.completion()
