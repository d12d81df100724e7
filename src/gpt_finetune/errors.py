"""The exception tree.

Every error a user can cause is a :class:`GptFinetuneError` carrying a one-line message and an
optional hint saying how to fix it. The CLI prints ``Error: <message>`` and ``Hint: <hint>`` and
exits 1; the server (later) maps the same classes to OpenAI's error JSON.

    GptFinetuneError
    ├── ConfigError          bad flag, config file line or environment value
    ├── DataError            bad input data; names file, line and field
    ├── BackendError         the fine-tuning backend refused or failed a request
    │   └── NotFoundError    no such file, job or model
    ├── DependencyError      an optional dependency is not installed
    └── StoreError           the data directory or its database cannot be used
"""

from __future__ import annotations

from pathlib import Path


class GptFinetuneError(Exception):
    """Base class: a message for the user and an optional hint."""

    code: str = "error"

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


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
        super().__init__(format_place(self.path, line, field) + message, hint=hint, code=code)


class BackendError(GptFinetuneError):
    code = "backend_error"


class NotFoundError(BackendError):
    code = "not_found"


class DependencyError(GptFinetuneError):
    code = "missing_dependency"


class StoreError(GptFinetuneError):
    code = "store_error"


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
