"""The FastAPI application: OpenAI's REST API over the services.

Thin by design (as vLLM's OpenAI entrypoint): routes parse the wire format and call the services
kept on ``app.state``; one handler turns every error into OpenAI's
``{"error": {message, type, param, code}}`` with its HTTP status. Around the routes: API keys
(Bearer, compared in constant time, never logged in full) and a limit on request bodies (413).
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..contract import LocalOptions
from ..errors import GptFinetuneError, error_body
from ..services import Services
from ..settings import redact
from .dashboard import SecurityHeaders, is_open
from .metrics import Metrics

log = logging.getLogger("gpt_finetune.server")

DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_MAX_BODY_MB = 16
OPEN_PATHS = ("/health",)  # answered without a key: load balancers and probes call it


MIN_KEY_LENGTH = 12  # a key anyone could guess protects nothing


@dataclass
class ServerConfig:
    api_keys: list[str] = field(default_factory=list)
    loopback: bool = True  # bound to a loopback address: only loopback Host names are answered
    allowed_hosts: list[str] = field(default_factory=list)  # Host names answered besides those
    cors_origins: list[str] = field(default_factory=list)  # web origins that may call it (CORS)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20
    max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20
    job_options: LocalOptions = field(default_factory=LocalOptions)  # local training settings for new jobs
    upstreams: Any = None  # server.upstream.Upstreams: chat answered by engines elsewhere (vLLM)
    vllm_max_lora_rank: int = 16  # what those engines load (their --max-lora-rank)


def error_response(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)  # OpenAI's shape, as every error


class BodyLimit:
    """Refuse request bodies over the limit with 413, whether or not they say their length;
    uploads (``/v1/files``) get their own, larger limit."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.config.max_upload_bytes if scope["path"].rstrip("/") == "/v1/files" else self.config.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(
            413, f"the request body is larger than this server's limit ({limit:,} bytes)", code="request_too_large"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_big(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # answered by the error handler, as any other error
                    raise _TooLarge(f"the request body is larger than this server's limit ({limit:,} bytes)")
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await too_big(scope, receive, send)


class _TooLarge(GptFinetuneError):
    code = "request_too_large"
    status = 413


class ApiKeys:
    """``Authorization: Bearer <key>`` against the operator's keys, in constant time."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        sent = [v for k, v in scope.get("headers") or [] if k == b"authorization"]
        if len(sent) > 1:  # which one counts would depend on the proxy in front: refuse
            response = error_response(401, "more than one Authorization header was sent", code="invalid_api_key")
            await response(scope, receive, send)
            return
        header = sent[0] if sent else b""
        scheme, _, given = header.partition(b" ")
        given = given.strip()
        ok = False
        for key in self.keys:  # every key is compared: the time does not say which one matched
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != b"bearer" or not given or not ok:
            shown = redact(given.decode("utf-8", "replace")) if given else "(none)"
            log.warning("refused a request to %s with API key %s", scope["path"], shown)
            message = (
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
                if not given
                else f"Incorrect API key provided: {shown}."
            )
            response = error_response(401, message, code="invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(services: Services, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    app = FastAPI(
        title="gpt-finetune",
        version=__version__,
        description="OpenAI's fine-tuning API on your machine",
        docs_url=None,  # served by .dashboard from the package's own copy of Swagger UI, not a CDN
        redoc_url=None,
    )
    app.state.services = services
    app.state.config = config
    app.state.metrics = Metrics(services)

    @app.exception_handler(GptFinetuneError)
    async def known(request: Request, exc: GptFinetuneError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        response = JSONResponse(exc.to_openai(), status_code=exc.status)
        if exc.status == 429:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, GptFinetuneError):
            # FastAPI turns any error while it parses a form into a 400; one of ours (a chunked
            # upload past the size limit: 413) keeps its own status
            return await known(request, exc.__cause__)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"Invalid URL ({request.method} {request.url.path})"
        return error_response(exc.status_code, message, code=None)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "The server had an error while processing your request.", type="server_error")

    from . import chat_routes, dashboard, routes

    app.include_router(routes.router)
    app.include_router(chat_routes.router)
    dashboard.mount(app)
    # outermost last: the guards (and the access log) see every request first, then CORS answers
    # the preflights of the origins the operator allows, before keys and limits
    app.add_middleware(ApiKeys, keys=config.api_keys)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, config=config)  # type: ignore[arg-type]
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,  # type: ignore[arg-type]
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
        )
    from .guards import Guards

    app.add_middleware(
        Guards,  # type: ignore[arg-type]
        loopback=config.loopback,
        allowed_hosts=config.allowed_hosts,
        cors_origins=config.cors_origins,
    )
    app.add_middleware(SecurityHeaders)  # type: ignore[arg-type]
    return app
