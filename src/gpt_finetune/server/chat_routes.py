"""``POST /v1/chat/completions``: whole answers, or server-sent chunks ending in ``[DONE]``.

The chat service checks the request and queues it on the engine thread; this route only waits
for it on the event loop. A client that disconnects (or whose request is cancelled) cancels its
handle, which stops its generation at the next token and frees its place in the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import BackendError, GptFinetuneError
from ..request_rules import body_doc, chat_schema
from ..services import Services
from .protocol import read_json

router = APIRouter()
log = logging.getLogger("gpt_finetune.server")


@router.post("/v1/chat/completions", response_model=None, openapi_extra=body_doc(chat_schema()))
async def create_chat_completion(request: Request) -> JSONResponse | StreamingResponse:
    services: Services = request.app.state.services
    metrics = request.app.state.metrics
    started = time.perf_counter()
    try:
        body = await read_json(request)
        upstreams = request.app.state.config.upstreams
        if upstreams is not None:
            return await _forward(request, upstreams, body, metrics, started)
        # model lookup reads the store and may load the engine's code: off the event loop
        run = await run_in_threadpool(services.chat.start, body)
        if not run.stream:
            answer = await _unless_gone(request, run)
            metrics.chat_seconds.labels("false").observe(time.perf_counter() - started)
            metrics.chat_requests.labels("ok").inc()
            return JSONResponse(answer)
        chunks = run.achunks()
        # the first chunk before the headers: a request the engine refuses (max_tokens past the
        # context, ...) gets its HTTP error, not a 200 whose stream then says it failed
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        metrics.first_token_seconds.observe(time.perf_counter() - started)
    except GptFinetuneError as exc:
        metrics.chat_requests.labels(outcome(exc.status)).inc()
        raise
    return StreamingResponse(
        _sse(first, chunks, metrics, started),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _forward(
    request: Request, upstreams: Any, body: Any, metrics: Any, started: float
) -> JSONResponse | StreamingResponse:
    """The request answered by an upstream engine (``server.upstream``); errors raised here are
    counted by the caller."""
    services: Services = request.app.state.services
    out, model, choices = await run_in_threadpool(upstreams.prepare, services, body)
    if not out.get("stream"):
        task = asyncio.ensure_future(upstreams.complete(out, model, choices))
        try:
            while True:  # a client that hangs up cancels the upstream request
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    answer = task.result()
                    break
                if await request.is_disconnected():
                    raise BackendError("the client closed the request", code="client_closed", status=499)
        finally:
            if not task.done():
                task.cancel()
        metrics.chat_seconds.labels("false").observe(time.perf_counter() - started)
        metrics.chat_requests.labels("ok").inc()
        return JSONResponse(answer)
    events = await upstreams.stream(out, model, choices)
    metrics.first_token_seconds.observe(time.perf_counter() - started)

    async def relay() -> AsyncIterator[str]:
        async for line in events:
            yield line
        metrics.chat_seconds.labels("true").observe(time.perf_counter() - started)
        metrics.chat_requests.labels("ok").inc()

    return StreamingResponse(
        relay(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def outcome(status: int) -> str:
    """A chat request's outcome, as the metrics label it."""
    if status < 400:
        return "ok"
    return {429: "rejected", 499: "client_closed"}.get(status, "invalid" if status < 500 else "error")


async def _unless_gone(request: Request, run: Any) -> dict[str, Any]:
    """The whole completion; a client that hangs up first cancels it, which frees its place in
    the engine's queue (or stops its generation) as a dropped stream does."""
    task = asyncio.ensure_future(run.acompletion())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                run.cancel()
                task.cancel()
                raise BackendError("the client closed the request", code="client_closed", status=499)
    finally:
        if not task.done():
            run.cancel()
            task.cancel()


async def _sse(
    first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]], metrics: Any, started: float
) -> AsyncIterator[str]:
    result = "ok"
    try:
        if first is not None:
            yield f"data: {json.dumps(first)}\n\n"
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
    except GptFinetuneError as exc:  # after the headers went out: an error event, as OpenAI sends
        result = outcome(exc.status)
        yield f"data: {json.dumps(exc.to_openai())}\n\n"
    except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
        metrics.chat_requests.labels("client_closed").inc()
        raise
    except Exception:  # a fault of ours mid-stream still ends the stream as the protocol says
        result = "error"
        log.exception("a chat stream failed")
        body = {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        yield f"data: {json.dumps(body)}\n\n"
    metrics.chat_seconds.labels("true").observe(time.perf_counter() - started)
    metrics.chat_requests.labels(result).inc()
    yield "data: [DONE]\n\n"
