"""A fake OpenAI organisation for the migration: jobs over several pages, files whose content is
refused, models that serve (and stop serving), chat answers, 429s with Retry-After, and the Batch
API. One handler serves both the SDK's mock transport (in-process tests) and a real HTTP server
on a loopback port (tests that run the console script in a subprocess and kill it)."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx2

KEY = "sk-test-1234567890"
REFUSED = "Not allowed to download files of purpose: fine-tune"


def error(status: int, message: str, code: str | None = None, param: str | None = None) -> tuple[int, dict, Any]:
    return status, {}, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


class FakeOrg:
    def __init__(self, organization: str = "org-acme", page_size: int = 2) -> None:
        self.organization = organization
        self.page_size = page_size  # jobs per page whatever the client asks: several pages
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: list[dict[str, Any]] = []  # oldest first; listed newest first
        self.models: dict[str, dict[str, Any]] = {}
        self.checkpoints: dict[str, list[dict[str, Any]]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.answer: Callable[[str, list[dict[str, Any]]], str] = lambda model, messages: "'proxy'"
        self.gone_after: dict[str, int] = {}  # model -> answers it gives before it stops serving
        self.rate_limited: dict[str, int] = {}  # model -> 429s it gives first (Retry-After: 1)
        self.chat_delay = 0.0
        # (prompt messages, answer) -> (prompt tokens, completion tokens); words by default
        self.usage: Callable[[list[dict[str, Any]], str], tuple[int, int]] = lambda messages, text: (
            sum(len(str(m.get("content", "")).split()) + 3 for m in messages),
            len(text.split()) + 1,
        )
        self.batch_polls = 0  # retrievals a batch stays in_progress before it completes
        self.answered: dict[str, int] = {}
        self.log: list[tuple[str, str, Any]] = []  # (method, path, JSON body or None)
        self.lock = threading.Lock()

    # ---- building the organisation ------------------------------------------------------------
    def add_file(self, content: bytes, filename: str, purpose: str = "fine-tune", *, refuse: bool = False) -> str:
        file_id = f"file-{len(self.files) + 1:04d}"
        self.files[file_id] = {
            "meta": {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": 1_700_000_000 + len(self.files),
                "filename": filename,
                "purpose": purpose,
                "status": "processed",
            },
            "content": content,
            "refuse": refuse,
        }
        return file_id

    def add_job(
        self,
        *,
        base: str,
        training_file: str,
        validation_file: str | None = None,
        status: str = "succeeded",
        suffix: str | None = None,
        n_epochs: int = 3,
        batch_size: int = 1,
        lr: float = 1.8,
        seed: int = 42,
        method: str = "supervised",
        serving: bool = True,
        shutdown_date: str | None = None,
    ) -> dict[str, Any]:
        n = len(self.jobs) + 1
        job_id = f"ftjob-Job{n:03d}"
        model = f"ft:{base}:acme:{suffix or ''}:Mdl{n:03d}" if status == "succeeded" else None
        hp = {"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": lr}
        if method == "dpo":
            hp["beta"] = 0.1
        result = self.add_file(b"step,train_loss\n1,0.5\n", "step_metrics.csv", "fine-tune-results") if model else None
        job = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": 1_700_000_000 + n * 100,
            "error": {"code": "invalid_training_file", "message": "bad file", "param": None}
            if status == "failed"
            else None,
            "fine_tuned_model": model,
            "finished_at": 1_700_000_050 + n * 100 if status in ("succeeded", "failed", "cancelled") else None,
            "hyperparameters": hp,
            "model": base,
            "organization_id": self.organization,
            "result_files": [result] if result else [],
            "seed": seed,
            "status": status,
            "trained_tokens": 1000 if model else None,
            "training_file": training_file,
            "validation_file": validation_file,
            "method": {"type": method, method: {"hyperparameters": hp}},
            "metadata": None,
            "user_provided_suffix": suffix,
        }
        self.jobs.append(job)
        if model and serving:
            self.models[model] = {
                "id": model,
                "object": "model",
                "created": job["finished_at"],
                "owned_by": self.organization,
                **({"shutdown_date": shutdown_date} if shutdown_date else {}),
            }
        if model:
            self.checkpoints[job_id] = [
                {
                    "id": f"ftckpt_{n}",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": job["finished_at"],
                    "fine_tuned_model_checkpoint": f"{model}:ckpt-step-10",
                    "fine_tuning_job_id": job_id,
                    "metrics": {"step": 10, "train_loss": 0.2},
                    "step_number": 10,
                }
            ]
        return job

    def chats(self, model: str | None = None) -> list[Any]:
        """The messages of every chat request (of one model), in order."""
        return [
            b["messages"]
            for m, p, b in self.log
            if p == "/v1/chat/completions" and (model is None or b["model"] == model)
        ]

    # ---- transports -------------------------------------------------------------------------------
    def client(self) -> httpx2.Client:
        def handle(request: httpx2.Request) -> httpx2.Response:
            request.read()
            status, headers, payload = self.handle(
                request.method, request.url.path, dict(request.url.params), dict(request.headers), request.content
            )
            if isinstance(payload, bytes):
                return httpx2.Response(status, headers=headers, content=payload)
            return httpx2.Response(status, headers=headers, json=payload)

        return httpx2.Client(transport=httpx2.MockTransport(handle))

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """A real HTTP server on a loopback port; yields its base URL (``.../v1``)."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, headers, payload = fake.handle(
                    self.command,
                    url.path,
                    dict(parse_qsl(url.query)),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header(
                    "content-type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
                )
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/v1"
        finally:
            server.shutdown()
            server.server_close()

    # ---- the API ------------------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict, Any]:
        parsed = json.loads(body) if body and headers.get("content-type", "").startswith("application/json") else None
        with self.lock:
            self.log.append((method, path, parsed))
        if headers.get("authorization") != f"Bearer {KEY}":
            return error(401, "Incorrect API key provided", "invalid_api_key")
        if path == "/v1/fine_tuning/jobs" and method == "GET":
            return self._page(list(reversed(self.jobs)), query)
        m = re.fullmatch(r"/v1/fine_tuning/jobs/([^/]+)/checkpoints", path)
        if m:
            return 200, {}, {"object": "list", "data": self.checkpoints.get(m.group(1), []), "has_more": False}
        if path == "/v1/models":
            return 200, {}, {"object": "list", "data": list(self.models.values())}
        m = re.fullmatch(r"/v1/files/([^/]+)(/content)?", path)
        if m and method == "GET":
            f = self.files.get(m.group(1))
            if f is None:
                return error(404, f"No such File object: {m.group(1)}", "file_not_found")
            if m.group(2):
                return error(400, REFUSED) if f["refuse"] else (200, {}, f["content"])
            return 200, {}, f["meta"]
        if path == "/v1/files" and method == "POST":
            return self._upload(headers, body)
        if path == "/v1/chat/completions" and method == "POST":
            return self._chat(parsed)
        if path == "/v1/batches" and method == "POST":
            return self._create_batch(parsed)
        if path == "/v1/batches" and method == "GET":
            return self._page(sorted(self.batches.values(), key=lambda b: -b["created_at"]), query, cap=False)
        m = re.fullmatch(r"/v1/batches/([^/]+)", path)
        if m and method == "GET":
            return self._retrieve_batch(m.group(1))
        return error(404, f"no route {method} {path}")

    def _page(self, items: list[dict[str, Any]], query: dict[str, str], cap: bool = True) -> tuple[int, dict, Any]:
        start = 0
        if query.get("after"):
            ids = [x["id"] for x in items]
            start = ids.index(query["after"]) + 1 if query["after"] in ids else len(ids)
        limit = int(query.get("limit", 20))
        if cap:
            limit = min(limit, self.page_size)
        page = items[start : start + limit]
        return 200, {}, {"object": "list", "data": page, "has_more": start + limit < len(items)}

    def _upload(self, headers: dict[str, str], body: bytes) -> tuple[int, dict, Any]:
        msg = BytesParser(policy=HTTP).parsebytes(
            b"content-type: " + headers["content-type"].encode() + b"\r\n\r\n" + body
        )
        fields: dict[str, Any] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        filename, content = fields["file"]
        purpose = fields["purpose"][1].decode()
        return 200, {}, self.files[self.add_file(content, filename or "upload", purpose)]["meta"]

    def _answer(self, body: dict[str, Any]) -> tuple[int, dict, Any]:
        model = body["model"]
        with self.lock:
            if self.rate_limited.get(model, 0) > 0:
                self.rate_limited[model] -= 1
                status, _, payload = error(429, "Rate limit reached", "rate_limit_exceeded")
                return status, {"retry-after": "1"}, payload
            if model not in self.models:
                return error(
                    404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found"
                )
            served = self.answered.get(model, 0)
            if model in self.gone_after and served >= self.gone_after[model]:
                self.models.pop(model)
                return error(
                    404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found"
                )
            self.answered[model] = served + 1
        text = self.answer(model, body["messages"])
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 3 for m in body["messages"])
        return (
            200,
            {},
            {
                "id": f"chatcmpl-{len(self.log)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(text.split()) + 1,
                    "total_tokens": prompt_tokens + len(text.split()) + 1,
                },
            },
        )

    def _chat(self, body: dict[str, Any]) -> tuple[int, dict, Any]:
        if self.chat_delay:
            time.sleep(self.chat_delay)
        return self._answer(body)

    def _create_batch(self, body: dict[str, Any]) -> tuple[int, dict, Any]:
        if body["input_file_id"] not in self.files:
            return error(400, "no such input file", param="input_file_id")
        batch_id = f"batch_{len(self.batches) + 1:03d}"
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "completion_window": body["completion_window"],
            "input_file_id": body["input_file_id"],
            "status": "validating",
            "created_at": int(time.time()) * 1000 + len(self.batches),
            "metadata": body.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "polls": 0,
        }
        return 200, {}, self._public(self.batches[batch_id])

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k != "polls"}

    def _retrieve_batch(self, batch_id: str) -> tuple[int, dict, Any]:
        batch = self.batches.get(batch_id)
        if batch is None:
            return error(404, f"No batch {batch_id}")
        batch["polls"] += 1
        if batch["status"] != "completed" and batch["polls"] > self.batch_polls:
            lines = self.files[batch["input_file_id"]]["content"].decode().splitlines()
            out, errs = [], []
            for line in lines:
                request = json.loads(line)
                status, _, payload = self._answer(request["body"])
                row = {
                    "id": f"batch_req_{len(out) + len(errs)}",
                    "custom_id": request["custom_id"],
                    "response": {"status_code": status, "request_id": "r", "body": payload},
                    "error": None,
                }
                (out if status == 200 else errs).append(json.dumps(row))
            batch["output_file_id"] = (
                self.add_file(("\n".join(out) + "\n").encode(), "out.jsonl", "batch_output") if out else None
            )
            batch["error_file_id"] = (
                self.add_file(("\n".join(errs) + "\n").encode(), "err.jsonl", "batch_output") if errs else None
            )
            batch["status"] = "completed"
            batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errs)}
        elif batch["status"] != "completed":
            batch["status"] = "in_progress"
        return 200, {}, self._public(batch)
