"""Batch inference: many chat requests from a JSONL file, resumable, nothing lost.

Input lines are OpenAI's Batch API format (``{"custom_id", "method", "url", "body"}``, the body a
chat-completions request) or plain chat examples (``{"messages": [...]}``; a trailing assistant
message, the reference, is left out of the prompt; ``custom_id`` is ``line-N``). Output lines are
the Batch API's: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}``, with ``error`` (and ``response: null``) for a line that failed, never a crash.

Each finished line is appended to ``OUTPUT.partial`` and flushed to disk at once, so an interrupt
(Ctrl-C, kill, power loss) loses at most the lines in flight; a rerun skips every custom_id the
partial file holds and does the rest. When all lines are done the output is written atomically,
in input order, and the partial file removed. Requests run on a few threads at once (remote
servers); errors that may pass (429, 5xx, a dropped connection) are retried with back-off.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .data.readers import iter_jsonl
from .errors import DataError, GptFinetuneError

RETRIABLE = {"rate_limit_exceeded", "server_error", "connection_error", "timeout"}
T = TypeVar("T")


@dataclass
class BatchResult:
    total: int
    skipped: int  # done by an earlier run
    succeeded: int
    failed: int


def read_requests(path: str | Path, model: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(custom_id, chat request body) for each line; a bad line is an error naming it."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for n, row in iter_jsonl(path):  # one line at a time, bounded, strict JSON (errors name the line)
        if not isinstance(row, dict):
            raise DataError("a line must be a JSON object", path=path, line=n)
        if "body" in row:
            custom_id, body = row.get("custom_id"), row["body"]
            if not isinstance(custom_id, str) or not custom_id:
                raise DataError("missing custom_id", path=path, line=n, field="custom_id")
            if row.get("url", "/v1/chat/completions") != "/v1/chat/completions":
                raise DataError("only /v1/chat/completions is supported", path=path, line=n, field="url")
            if not isinstance(body, dict):
                raise DataError("body must be an object", path=path, line=n, field="body")
            body = dict(body)
        elif isinstance(row.get("messages"), list):
            custom_id = str(row.get("custom_id") or f"line-{n}")
            messages = list(row["messages"])
            while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                messages.pop()
            body = {"messages": messages}
        else:
            raise DataError("neither a Batch API request nor a chat example", path=path, line=n)
        if custom_id in seen:
            raise DataError(f"custom_id {custom_id!r} appears twice", path=path, line=n, field="custom_id")
        seen.add(custom_id)
        if model:
            body["model"] = model
        if not body.get("model"):
            raise DataError("no model: give --model or a model in the body", path=path, line=n, field="body.model")
        out.append((custom_id, body))
    return out


def run_bounded(
    fn: Callable[[Any], Any], items: Iterable[Any], *, concurrency: int, stop: threading.Event | None = None
) -> None:
    """``fn(item)`` for each item on ``concurrency`` threads, submitted a few at a time so that
    Ctrl-C (or ``stop``) ends the run soon; an exception of ``fn`` is raised here."""
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    pending: set[Future[Any]] = set()
    it = iter(items)
    end = object()
    try:
        while stop is None or not stop.is_set():
            while len(pending) < max(1, concurrency) and (stop is None or not stop.is_set()):
                nxt = next(it, end)
                if nxt is end:
                    break
                pending.add(pool.submit(fn, nxt))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def retriable(exc: GptFinetuneError) -> bool:
    """Whether a refused request may pass if asked again: rate limits, server faults, drops."""
    return exc.code in RETRIABLE or exc.status == 429 or exc.status >= 500


def call_with_retries(fn: Callable[[], T], *, retries: int = 3, backoff: float = 1.0) -> T:
    """``fn()``, asked again up to ``retries`` times when it fails in a way that may pass, after
    the wait the server asked for (Retry-After) or an exponential back-off."""
    attempt = 0
    while True:
        try:
            return fn()
        except GptFinetuneError as exc:
            attempt += 1
            if not retriable(exc) or attempt > retries:
                raise
            asked = getattr(exc, "retry_after", None)
            time.sleep(asked if asked is not None else backoff * 2 ** (attempt - 1))


def completed_lines(partial: Path) -> dict[str, str]:
    """custom_id -> its line, from an append-only JSONL file (a torn last line is dropped)."""
    if not partial.exists():
        return {}
    data = partial.read_bytes()
    if data and not data.endswith(b"\n"):  # killed in the middle of a write
        data = data[: data.rfind(b"\n") + 1]
        with open(partial, "r+b") as fh:
            fh.truncate(len(data))
    done = {}
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            done[json.loads(line)["custom_id"]] = line
    return done


def run_batch(
    chat: Callable[[dict[str, Any]], dict[str, Any]],
    input_path: str | Path,
    output_path: str | Path,
    *,
    model: str | None = None,
    concurrency: int = 4,
    retries: int = 3,
    backoff: float = 1.0,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    chat_many: Callable[[list[dict[str, Any]]], list[Any]] | None = None,
    group: int = 8,
) -> BatchResult:
    """``chat(body) -> ChatCompletion dict``; raises GptFinetuneError for a refused request.
    ``chat_many(bodies)`` (local models) answers ``group`` lines at once, each answer or its error."""
    requests = read_requests(input_path, model)
    output = Path(output_path)
    partial = output.with_name(output.name + ".partial")
    done = completed_lines(partial)
    todo = [(cid, body) for cid, body in requests if cid not in done]
    if on_start:
        on_start(len(requests), len(requests) - len(todo))
    lock = threading.Lock()

    def write(custom_id: str, response: Any) -> str:
        record: dict[str, Any]
        if isinstance(response, GptFinetuneError):
            record = {
                "id": f"batch_req_{secrets.token_hex(12)}",
                "custom_id": custom_id,
                "response": None,
                "error": {"code": response.code, "message": response.message},
            }
        else:
            record = {
                "id": f"batch_req_{secrets.token_hex(12)}",
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": secrets.token_hex(8), "body": response},
                "error": None,
            }
        line = json.dumps(record, ensure_ascii=False)
        with lock:
            with open(partial, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        if progress:
            progress(1)
        return line

    if chat_many is not None:
        for start in range(0, len(todo), max(1, group)):
            chunk = todo[start : start + max(1, group)]
            for (custom_id, _), response in zip(chunk, chat_many([b for _, b in chunk]), strict=True):
                write(custom_id, response)

    def one(custom_id: str, body: dict[str, Any]) -> str:
        try:
            return write(custom_id, call_with_retries(lambda: chat(body), retries=retries, backoff=backoff))
        except GptFinetuneError as exc:
            return write(custom_id, exc)

    run_bounded(lambda item: one(*item), todo if chat_many is None else [], concurrency=concurrency)
    done = completed_lines(partial)
    failed = sum(1 for line in done.values() if json.loads(line)["error"] is not None)
    from .atomic import write_text_atomic

    write_text_atomic(output, "".join(done[cid] + "\n" for cid, _ in requests))
    partial.unlink()
    return BatchResult(len(requests), len(requests) - len(todo), len(requests) - failed, failed)
