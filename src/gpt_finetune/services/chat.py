"""Chat completions: an OpenAI chat-completion request in, OpenAI's ``ChatCompletion`` or its
chunks out. The local backend, the server and evaluation all call this.

The request is checked by ``request_rules.parse_chat``, once, field by field: what the engine
supports is used; the neutral values that clients always send (``n=1``, ``presence_penalty=0``,
``logit_bias={}`` as LangChain and others do) are accepted; anything else the engine cannot honour
(tools, penalties, JSON mode, audio, ...) is refused with a 400 that names the field, never
silently ignored.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..errors import GptFinetuneError
from ..request_rules import parse_chat
from .models import ModelService

# the request is checked by request_rules.parse_chat; kept under its old name for callers
parse_request = parse_chat


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

    def running(self) -> int:
        """Requests the engine is answering (0 before the first one loads it)."""
        return self._engine.running() if self._engine is not None else 0

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
                label_choice=parsed["label_choice"],
            )
        )
        return ChatRun(handle, parsed, parsed["model"])

    def create_many(self, requests: list[Any], *, batch_size: int = 8) -> list[dict[str, Any] | GptFinetuneError]:
        """Several requests (a batch file, an evaluation): each answer, or the error that refused
        it, in order. Up to ``batch_size`` are in the engine at once, where they are batched with
        each other and with whatever else it is answering (its continuous batching)."""
        from collections import deque

        out: list[dict[str, Any] | GptFinetuneError | None] = [None] * len(requests)
        in_flight: deque[tuple[int, ChatRun]] = deque()

        def collect() -> None:
            i, run = in_flight.popleft()
            try:
                out[i] = run.completion()
            except GptFinetuneError as exc:
                out[i] = exc

        for i, request in enumerate(requests):
            while len(in_flight) >= max(1, batch_size):
                collect()
            try:
                in_flight.append((i, self.start(request)))
            except GptFinetuneError as exc:  # refused before it reached the engine
                out[i] = exc
        while in_flight:
            collect()
        assert all(x is not None for x in out)  # every request got its answer or its error
        return [x for x in out if x is not None]

    def create(self, request: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """The whole completion, or (``stream``) an iterator of chunks."""
        run = self.start(request)
        return run.chunks() if run.stream else run.completion()
