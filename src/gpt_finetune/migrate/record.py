"""``migrate record``: the old model's greedy answers to a prompt set, kept while it still serves.

This is the one step that cannot be done after the shutdown. Answers are appended to
``recordings/<key>.jsonl`` and flushed to disk one by one, so a kill loses at most the requests in
flight, and a rerun asks only the prompts with no answer yet. Live requests run ``concurrency``
at a time with the retries batch files use (429 after its Retry-After, 5xx, drops); a model
that no longer serves (404) stops its recording at the first refusal: what was recorded is kept.

Through OpenAI's Batch API (``--batch-api``, half the price): the unanswered prompts become one
batch per round; each round's input file and batch id are written to ``batches/<key>.json`` as
soon as OpenAI returns them, and each batch carries this migration's id in its metadata, so a
process killed at any point finds its batch again (by id, or by listing the batches) instead of
creating a second one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..batch import call_with_retries, completed_lines, run_bounded
from ..data.readers import iter_jsonl
from ..errors import BackendError, DataError, GptFinetuneError, NotFoundError
from ..store import now
from . import manifest as mf

FATAL = {"invalid_api_key", "permission_denied", "connection_error"}  # every other request would fail too
BATCH_DONE = ("completed", "failed", "expired", "cancelled")


@dataclass
class Recorded:
    key: str
    total: int
    before: int  # answered by an earlier run
    answered: int = 0  # by this run
    failed: list[str] = field(default_factory=list)
    gone: str | None = None  # why the model no longer answers
    pending: str | None = None  # a Batch API batch still running

    @property
    def done(self) -> int:
        return self.before + self.answered


def prompts_path(root: Path, key: str) -> Path:
    return root / "prompts" / f"{key}.jsonl"


def recordings_path(root: Path, key: str) -> Path:
    return root / "recordings" / f"{key}.jsonl"


def batches_path(root: Path, key: str) -> Path:
    return root / "batches" / f"{key}.json"


def recordings(root: Path, key: str) -> dict[str, dict[str, Any]]:
    """custom_id -> its recorded answer."""
    return {cid: json.loads(line) for cid, line in completed_lines(recordings_path(root, key)).items()}


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Chat JSONL as a prompt set: each line's messages before a trailing assistant message (which
    becomes the reference), in order."""
    out: list[dict[str, Any]] = []
    for n, row in iter_jsonl(path):  # bounded lines, strict JSON, errors naming the line
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataError("not a chat example with a list of messages", path=str(path), line=n, field="messages")
        reference = None
        if messages and messages[-1].get("role") == "assistant":
            reference = messages[-1].get("content")
            messages = messages[:-1]
        if not messages:
            raise DataError("no prompt before the assistant message", path=str(path), line=n, field="messages")
        out.append({"custom_id": f"p{len(out) + 1:05d}", "messages": messages, "reference": reference})
    if not out:
        raise DataError("no prompts", path=str(path))
    return out


def prompt_set(
    root: Path, manifest: mf.Manifest, model: mf.Model, *, prompts_file: str | None = None, limit: int | None = None
) -> tuple[list[dict[str, Any]] | None, str]:
    """The prompts to record for a model, and where they come from (or None and why not). The set
    is fixed at the first record (``prompts/<key>.jsonl``), so every run asks the same prompts."""
    fixed = prompts_path(root, model.key)
    if fixed.is_file():
        rows = [json.loads(line) for line in fixed.read_text(encoding="utf-8").splitlines() if line.strip()]
        return rows, f"the prompt set fixed at its first record ({fixed.relative_to(root)})"
    job = manifest.job(model.job)
    source = None
    if prompts_file:
        source, what = Path(prompts_file), f"--prompts {prompts_file}"
    elif job is not None:
        for name in ("validation_file", "training_file"):
            ref = getattr(job, name)
            if ref is not None and ref.local:
                source, what = root / ref.local, f"the prompts of its {name.replace('_', ' ')} {ref.id}"
                break
    if source is None:
        return None, "no prompts: neither its validation nor its training file was recovered; give --prompts FILE"
    rows = read_prompts(source)[:limit] if limit else read_prompts(source)
    fixed.parent.mkdir(exist_ok=True)
    write_text_atomic(fixed, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows, what


class _Appender:
    """Appends recordings one line at a time, each flushed to disk before the next is asked."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()

    def add(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self.lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _answer(custom_id: str, completion: Any, via: str, latency: float | None) -> dict[str, Any]:
    get = (lambda o, k: o.get(k)) if isinstance(completion, dict) else getattr
    choice = get(completion, "choices")[0]
    message = get(choice, "message")
    usage = get(completion, "usage")
    if usage is not None and not isinstance(usage, dict):
        usage = usage.model_dump(exclude_none=True)
    return {
        "custom_id": custom_id,
        "answer": get(message, "content") or "",
        "finish_reason": get(choice, "finish_reason"),
        "usage": usage,
        "latency_s": round(latency, 4) if latency is not None else None,
        "via": via,
        "recorded_at": now(),
    }


def record_live(
    source: Any,
    root: Path,
    model: mf.Model,
    prompts: list[dict[str, Any]],
    *,
    concurrency: int = 4,
    max_tokens: int | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> Recorded:
    path = recordings_path(root, model.key)
    done = completed_lines(path)
    todo = [p for p in prompts if p["custom_id"] not in done]
    result = Recorded(model.key, len(prompts), len(prompts) - len(todo))
    out = _Appender(path)
    stop = threading.Event()
    fatal: list[GptFinetuneError] = []
    params: dict[str, Any] = {"temperature": 0}
    if max_tokens:
        params["max_tokens"] = max_tokens

    def one(prompt: dict[str, Any]) -> None:
        if stop.is_set():
            return
        started = time.perf_counter()
        try:
            completion = call_with_retries(
                lambda: source.chat(model=model.id, messages=prompt["messages"], **params),
                retries=retries,
                backoff=backoff,
            )
        except NotFoundError as exc:  # the model is gone: the other prompts would be refused too
            result.gone = result.gone or exc.message
            stop.set()
            return
        except GptFinetuneError as exc:
            result.failed.append(f"{prompt['custom_id']}: {exc.message}")
            if exc.code in FATAL:
                fatal.append(exc)
                stop.set()
            return
        out.add(_answer(prompt["custom_id"], completion, "live", time.perf_counter() - started))
        with out.lock:
            result.answered += 1
        if progress:
            progress(1)

    run_bounded(one, todo, concurrency=concurrency, stop=stop)
    if fatal:
        raise fatal[0]
    return result


# ---- the Batch API ------------------------------------------------------------------------------
def _state(root: Path, key: str) -> dict[str, Any]:
    path = batches_path(root, key)
    if not path.is_file():
        return {"rounds": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("rounds"), list):
        raise DataError("not a batch state file", path=str(path), hint="remove it to start the key's batches again")
    return state


def save_state(root: Path, key: str, state: dict[str, Any]) -> None:
    path = batches_path(root, key)
    path.parent.mkdir(exist_ok=True)
    write_text_atomic(path, json.dumps(state, indent=1) + "\n")


def record_batch(
    source: Any,
    root: Path,
    manifest: mf.Manifest,
    model: mf.Model,
    prompts: list[dict[str, Any]],
    *,
    max_tokens: int | None = None,
    wait_done: bool = True,
    poll: float = 10.0,
    say: Callable[[str], None] = lambda _m: None,
) -> Recorded:
    done = completed_lines(recordings_path(root, model.key))
    todo = [p for p in prompts if p["custom_id"] not in done]
    result = Recorded(model.key, len(prompts), len(prompts) - len(todo))
    state = _state(root, model.key)
    rounds = state["rounds"]
    current = rounds[-1] if rounds and not rounds[-1].get("ingested") else None
    if current is None:
        if not todo:
            return result
        current = {"round": len(rounds) + 1, "input_file": None, "batch": None, "status": None, "ingested": False}
        rounds.append(current)
        save_state(root, model.key, state)
    marks = {"gpt_finetune_migration": manifest.migration_id, "key": model.key, "round": str(current["round"])}
    if current["batch"] is None:
        found = [b for b in source.list_batches() if dict(getattr(b, "metadata", None) or {}) == marks]
        if found:  # created by a run that died before it could write the id down
            current["batch"] = found[0].id
            say(f"{model.key}: found batch {found[0].id} created by an earlier run")
        else:
            if current["input_file"] is None:
                lines = []
                for p in todo:
                    body: dict[str, Any] = {"model": model.id, "messages": p["messages"], "temperature": 0}
                    if max_tokens:
                        body["max_tokens"] = max_tokens
                    lines.append(
                        {"custom_id": p["custom_id"], "method": "POST", "url": "/v1/chat/completions", "body": body}
                    )
                data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()
                uploaded = source.upload_bytes(f"{model.key}-round{current['round']}.jsonl", data, "batch")
                current["input_file"] = uploaded.id
                save_state(root, model.key, state)
            batch = source.create_batch(current["input_file"], metadata=marks)
            current["batch"] = batch.id
            say(f"{model.key}: created batch {batch.id} ({len(todo)} requests)")
        save_state(root, model.key, state)
    while True:
        batch = source.retrieve_batch(current["batch"])
        current["status"] = batch.status
        if batch.status in BATCH_DONE or not wait_done:
            break
        counts = getattr(batch, "request_counts", None)
        if counts is not None:
            say(f"{model.key}: batch {batch.id} {batch.status}: {counts.completed}/{counts.total} done")
        time.sleep(poll)
    save_state(root, model.key, state)
    if batch.status not in BATCH_DONE:
        result.pending = f"batch {batch.id} is {batch.status}; run record again to collect it"
        return result
    out = _Appender(recordings_path(root, model.key))
    refused = 0
    for file_id in (getattr(batch, "output_file_id", None), getattr(batch, "error_file_id", None)):
        if not file_id:
            continue
        for line in source.file_content(file_id).decode("utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            cid = row.get("custom_id")
            response = row.get("response") or {}
            if response.get("status_code") == 200 and cid not in done:
                out.add(_answer(cid, response["body"], "batch", None))
                done[cid] = line
                result.answered += 1
                continue
            error = row.get("error") or (response.get("body") or {}).get("error") or {}
            code = error.get("code") if isinstance(error, dict) else None
            message = error.get("message") if isinstance(error, dict) else str(error)
            refused += code == "model_not_found" or response.get("status_code") == 404
            result.failed.append(f"{cid}: {message or code or response.get('status_code')}")
    if refused and result.answered == 0:
        result.gone = f"the batch's requests were refused: the model {model.id} does not exist (404)"
    if batch.status != "completed" and not result.failed:
        result.failed.append(f"batch {batch.id} {batch.status}")
    current["ingested"] = True
    save_state(root, model.key, state)
    return result


def check_organization(source: Any, manifest: mf.Manifest) -> None:
    """Refuse to record into a migration directory of another organisation."""
    if not manifest.organization:
        return
    try:
        jobs = source.list_jobs(limit=1)
    except BackendError:
        return  # the request that follows reports what is wrong
    org = next((str(j.organization_id) for j in jobs if getattr(j, "organization_id", None)), None)
    if org and org != manifest.organization:
        from ..errors import ConfigError

        raise ConfigError(
            f"the migration directory is organisation {manifest.organization}'s, but this API key belongs to {org}",
            hint="use the key of the organisation the directory is for, or another directory",
        )
