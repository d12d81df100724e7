"""The exception tree.

Every error a user can cause is a :class:`GptFinetuneError` carrying a one-line message and an
optional hint saying how to fix it, and what an HTTP adapter needs to answer it as OpenAI does:
an HTTP ``status``, OpenAI's error ``type``, the ``param`` at fault and a ``code``. The CLI prints
``Error: <message>`` and ``Hint: <hint>`` and exits 1; an HTTP adapter answers ``to_openai()``
with ``status`` from one handler.

    GptFinetuneError         400 invalid_request_error
    ├── ConfigError          400  bad flag, config file line or environment value
    ├── DataError            400  bad input data; names file, line and field (param: the field)
    ├── BackendError         400  the fine-tuning backend refused or failed a request (or as given)
    │   └── NotFoundError    404  no such file, job or model
    ├── DependencyError      500 server_error  an optional dependency is not installed
    └── StoreError           500 server_error  the data directory or its database cannot be used
"""

from __future__ import annotations

from pathlib import Path

MAX_MESSAGE = 1000  # characters: an error never echoes a 15 MB value back


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


class GptFinetuneError(Exception):
    """Base class: a message for the user and an optional hint (each at most MAX_MESSAGE
    characters, whatever value they quote)."""

    code: str = "error"
    status: int = 400
    type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        code: str | None = None,
        status: int | None = None,
        param: str | None = None,
    ) -> None:
        message = shorten(message)
        super().__init__(message)
        self.message = message
        self.hint = shorten(hint) if hint else hint
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message

    def to_openai(self) -> dict[str, dict[str, str | None]]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    """OpenAI's error body: ``{"error": {message, type, param, code}}``, the one builder of it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ConfigError(GptFinetuneError):
    code = "invalid_config"


class DataError(GptFinetuneError):
    """Bad input data. The message starts with ``file:line:`` and names the field."""

    code = "invalid_training_file"

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
        code: str | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.detail = message
        super().__init__(format_place(self.path, line, field) + message, hint=hint, code=code, param=field)


class BackendError(GptFinetuneError):
    code = "backend_error"
    retry_after: float | None = None  # seconds the server asked a client to wait (HTTP 429)


class NotFoundError(BackendError):
    code = "not_found"
    status = 404


class DependencyError(GptFinetuneError):
    code = "missing_dependency"
    status = 500
    type = "server_error"


class StoreError(GptFinetuneError):
    code = "store_error"
    status = 500
    type = "server_error"


def format_place(path: str | None, line: int | None, field: str | None) -> str:
    """``file:line: field: `` with the parts that are known."""
    parts = []
    if path is not None:
        parts.append(path if line is None else f"{path}:{line}")
    elif line is not None:
        parts.append(f"line {line}")
    if field:
        parts.append(field)
    return "".join(p + ": " for p in parts)
