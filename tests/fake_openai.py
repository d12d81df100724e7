"""A scripted OpenAI API on httpx's mock transport: records every request the SDK sends."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx2


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.files = 0
        self.answer = "'proxy'"
        # (method, path) -> a scripted failure: (status, error code, headers), or "drop"
        self.failures: dict[tuple[str, str], Any] = {}

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle))

    def bodies(self, method: str, path: str) -> list[Any]:
        out = []
        for r in self.requests:
            if r.method == method and r.url.path == path:
                out.append(json.loads(r.content) if r.headers.get("content-type") == "application/json" else r.content)
        return out

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.requests.append(request)
        path = request.url.path
        failure = self.failures.get((request.method, path))
        if failure == "drop":
            raise httpx2.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        if failure is not None:
            status, code, headers = failure
            return httpx2.Response(
                status,
                headers=headers,
                json={"error": {"message": f"scripted {status}", "type": "x", "param": None, "code": code}},
            )
        if request.headers.get("authorization") != "Bearer sk-test-1234567890":
            return httpx2.Response(
                401,
                json={
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )
        if path == "/v1/files" and request.method == "POST":
            self.files += 1
            return httpx2.Response(
                200,
                json={
                    "id": f"file-{self.files}",
                    "object": "file",
                    "bytes": len(request.content),
                    "created_at": 1,
                    "filename": "x.jsonl",
                    "purpose": "fine-tune",
                    "status": "processed",
                },
            )
        if path == "/v1/fine_tuning/jobs" and request.method == "POST":
            body = json.loads(request.content)
            job = {
                "id": f"ftjob-{len(self.jobs) + 1}",
                "object": "fine_tuning.job",
                "created_at": 1,
                "error": None,
                "fine_tuned_model": None,
                "finished_at": None,
                "hyperparameters": {"n_epochs": "auto"},
                "model": body["model"],
                "organization_id": "org",
                "result_files": [],
                "seed": 1,
                "status": "validating_files",
                "trained_tokens": None,
                "training_file": body["training_file"],
                "validation_file": body.get("validation_file"),
            }
            self.jobs[job["id"]] = job
            return httpx2.Response(200, json=job)
        m = re.fullmatch(r"/v1/fine_tuning/jobs/([^/]+)", path)
        if m:
            if m.group(1) not in self.jobs:
                return httpx2.Response(
                    404,
                    json={
                        "error": {
                            "message": f"Job {m.group(1)} not found",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    },
                )
            return httpx2.Response(200, json=self.jobs[m.group(1)])
        if path == "/v1/chat/completions":
            body = json.loads(request.content)
            return httpx2.Response(
                200,
                json={
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": self.answer}}
                    ],
                },
            )
        return httpx2.Response(404, json={"error": {"message": "no route", "type": "x", "param": None, "code": None}})
