"""What keeps a web page from driving the server, and what keeps logs honest.

A server on loopback with no keys trusts whoever can reach it: the user's own programs. A web
page the user opens can reach it too, two ways, and these close both:

- **DNS rebinding**: a page whose host name the attacker points at 127.0.0.1 talks to the server
  as a same-origin page and can read every answer. The ``Host`` header still carries the
  attacker's name, so a server bound to loopback answers only loopback host names (and the names
  the operator allows); one bound elsewhere answers the names the operator allows, or any when
  none are given (it needs API keys there).
- **Cross-site requests**: a page can send "simple" requests without a CORS preflight: bodies as
  ``text/plain`` or forms. Request bodies must therefore be ``application/json`` (uploads
  ``multipart/form-data``), which a page cannot send cross-origin without a preflight the server
  never grants; and a request whose ``Origin`` is neither the server's own nor an allowed one is
  refused, which also covers the multipart form a page could post. No CORS headers are sent
  unless the operator names origins (``--cors-origin``).

The access log is written here too (uvicorn's is off): query strings are redacted (a key sent
as ``?api_key=`` must not land in a log) and control characters escaped (a URL with an encoded
newline cannot forge a log line).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "ip6-localhost", "ip6-loopback")
BODY_METHODS = (b"POST", b"PUT", b"PATCH")
access_log = logging.getLogger("gpt_finetune.server.access")


def printable(text: str, limit: int = 300) -> str:
    """Text safe for one log line: control characters escaped, at most ``limit`` characters."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def host_name(header: str) -> str:
    """``Host`` without its port, lower case (``[::1]:8000`` -> ``::1``)."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_HOSTS or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guards:
    """Host, Origin and content-type rules, and the access log, in front of the routes."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        loopback: bool,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
    ) -> None:
        from .app import error_response

        self.app = app
        self.loopback = loopback
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}
        self.error_response = error_response

    def host_allowed(self, name: str) -> bool:
        if name in self.allowed_hosts:
            return True
        if self.loopback:
            return is_loopback_name(name)
        return not self.allowed_hosts  # bound elsewhere: keys protect it; names only if given

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, tracked)
            else:
                await self.app(scope, receive, tracked)
        finally:
            client = scope.get("client") or ("-", 0)
            query = " ?(query redacted)" if scope.get("query_string") else ""
            access_log.info(
                "%s %s %s%s %d %.0f ms",
                client[0],
                scope.get("method", "-"),
                printable(scope.get("path", "")),
                query,
                status[0],
                (time.perf_counter() - started) * 1000,
            )

    def refusal(self, scope: Scope) -> ASGIApp | None:
        headers: dict[bytes, list[bytes]] = {}
        for key, value in scope.get("headers") or []:
            headers.setdefault(key, []).append(value)
        hosts = headers.get(b"host", [])
        name = host_name(hosts[0].decode("latin-1")) if len(hosts) == 1 else ""
        if not self.host_allowed(name):
            return self.error_response(
                400,
                "this server does not answer that Host name"
                + (" (a server on loopback answers only localhost and loopback addresses)" if self.loopback else ""),
                code="invalid_host",
            )
        origins = headers.get(b"origin", [])
        if origins:
            origin = origins[0].decode("latin-1").rstrip("/").lower()
            same = len(origins) == 1 and urlsplit(origin).netloc == hosts[0].decode("latin-1").strip().lower()
            if origin not in self.cors_origins and not same:
                return self.error_response(
                    403,
                    "requests from this web origin are not allowed (the operator allows origins with --cors-origin)",
                    code="origin_not_allowed",
                )
        if scope.get("method", "").encode() in BODY_METHODS and self._has_body(headers):
            kind = (headers.get(b"content-type") or [b""])[0].decode("latin-1").split(";")[0].strip().lower()
            upload = scope["path"].rstrip("/") == "/v1/files"
            wanted = "multipart/form-data" if upload else "application/json"
            if kind != wanted:
                return self.error_response(
                    415,
                    f"the request body must be sent as {wanted}, not {printable(kind, 80) or 'without a Content-Type'}",
                    code="unsupported_media_type",
                )
        return None

    @staticmethod
    def _has_body(headers: dict[bytes, list[bytes]]) -> bool:
        length = (headers.get(b"content-length") or [b"0"])[0]
        return b"transfer-encoding" in headers or not length.isdigit() or int(length) > 0
