"""The seed's ``key = value`` configuration files.

Rules (README, "Config files"):

- one ``key = value`` per line; the value is everything after the first ``=`` (so it may itself
  contain ``=``), stripped of surrounding blanks;
- blank lines and lines starting with ``#`` are ignored; elsewhere ``#`` starts a comment, except
  in the free-text keys (``sys_prompt``, ``user_input``) where it is part of the text;
- a value written as a placeholder (``<openai_api_key>``, as in the seed's sample files) counts as
  unset, with a warning;
- a key the project does not know draws a warning naming the file and line; a repeated key
  draws one too, and the later line wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

FREE_TEXT_KEYS = frozenset({"sys_prompt", "user_input"})
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_PLACEHOLDER = re.compile(r"^<[^<>]*>$")


@dataclass(frozen=True)
class CfgValue:
    value: str
    path: str
    line: int

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class CfgFile:
    values: dict[str, CfgValue]
    warnings: list[str]


def read_cfg(path: str | Path, known_keys: frozenset[str] | set[str] | None = None) -> CfgFile:
    """Read a ``key = value`` file. Raises :class:`ConfigError` naming file and line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text") from None
    values: dict[str, CfgValue] = {}
    warnings: list[str] = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        stripped = raw_line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "=" not in stripped:
            raise ConfigError(
                f"{p}:{lineno}: expected 'key = value', got {stripped[:60]!r}",
                hint="each line of a config file is 'key = value'; '#' starts a comment",
            )
        key, _, value = stripped.partition("=")
        key = key.strip()
        if not _KEY.match(key):
            raise ConfigError(f"{p}:{lineno}: {key!r} is not a valid key name")
        if key not in FREE_TEXT_KEYS and "#" in value:
            value = value.split("#", 1)[0]
        value = value.strip()
        if known_keys is not None and key not in known_keys:
            warnings.append(f"{p}:{lineno}: unknown key {key!r} ignored (known: {', '.join(sorted(known_keys))})")
            continue
        if _PLACEHOLDER.match(value):
            warnings.append(f"{p}:{lineno}: {key} is a placeholder ({value}); treated as unset")
            continue
        if key in values:
            warnings.append(f"{p}:{lineno}: {key} repeats line {values[key].line}; this line wins")
        values[key] = CfgValue(value, str(p), lineno)
    return CfgFile(values, warnings)
