"""One typed configuration model and its precedence.

Highest first: command-line flags, a config file named with ``-c`` (the seed's ``key = value``
files), the environment (``GPT_FINETUNE_<KEY>``, plus ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL``),
the default config file (``$GPT_FINETUNE_HOME/config.cfg``), then the defaults below.
Every value remembers where it came from, so an error can name the flag, file line or variable.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .cfgfile import read_cfg
from .errors import ConfigError

AUTO = "auto"
SEED_MAX = 2**31 - 1
# a suffix becomes part of model ids (ft:<base>:<suffix>:<job>), whose ':' separate the parts
SUFFIX_MAX = 64
SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def suffix_problem(suffix: str) -> str | None:
    """Why a suffix cannot be used, or None: up to 64 letters, digits and . _ - (no ':' or '/');
    an empty one is no suffix."""
    if not suffix:
        return None
    if len(suffix) > SUFFIX_MAX:
        return f"suffix is longer than {SUFFIX_MAX} characters"
    if not SUFFIX_PATTERN.fullmatch(suffix):
        return "suffix may hold only letters, digits and . _ - (it becomes part of the model id)"
    return None


_ASCII_INT = re.compile(r"[0-9]+")
_ASCII_FLOAT = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _whole(text: str) -> int:
    """A whole number as people write one: ASCII digits only (no sign, no ``1_000``, no ``٣``)."""
    t = text.strip()
    if not _ASCII_INT.fullmatch(t):
        raise ValueError("expected a whole number written with the digits 0-9")
    return int(t)


def _number(text: str) -> float:
    """A finite decimal number, ASCII, unsigned (no ``inf``, ``nan``, ``1_0`` or ``+2``)."""
    t = text.strip()
    if not _ASCII_FLOAT.fullmatch(t):
        raise ValueError("expected a number written with the digits 0-9 (and . or e)")
    value = float(t)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _int_or_auto(lo: int, hi: int) -> Callable[[str], int | str]:
    def parse(text: str) -> int | str:
        if text.strip().lower() == AUTO:
            return AUTO
        try:
            value = _whole(text)
        except ValueError:
            raise ValueError(f"expected a whole number from {lo} to {hi} or 'auto'") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be from {lo} to {hi}")
        return value

    return parse


def _positive_float_or_auto(text: str) -> float | str:
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = _number(text)
    except ValueError:
        raise ValueError("expected a positive number or 'auto'") from None
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = _number(text)
        except ValueError:
            raise ValueError(f"expected a number from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be from {lo} to {hi}")
        return value

    return parse


def _positive_int(text: str) -> int:
    try:
        value = _whole(text)
    except ValueError:
        raise ValueError("expected a positive whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _seed(text: str) -> int:
    try:
        value = _whole(text)
    except ValueError:
        raise ValueError(f"expected a whole number from 0 to {SEED_MAX}") from None
    if value > SEED_MAX:
        raise ValueError(f"must be from 0 to {SEED_MAX}")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value

    return parse


def _str(text: str) -> str:
    return text


def _date(text: str) -> str:
    """A calendar day, ``YYYY-MM-DD`` (kept as text: the settings stay plain values)."""
    import datetime as dt

    t = text.strip()
    try:
        if len(t) != 10:
            raise ValueError
        dt.date.fromisoformat(t)
    except ValueError:
        raise ValueError("expected a date written YYYY-MM-DD") from None
    return t


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _opt(parse: Callable[[str], Any], env: tuple[str, ...] = (), secret: bool = False) -> Any:
    return field(default=None, metadata={"parse": parse, "env": env, "secret": secret})


@dataclass
class Settings:
    """Every setting any command reads. Names are the seed's config keys."""

    # where to send jobs
    openai_api_key: str | None = _opt(_str, env=("OPENAI_API_KEY",), secret=True)
    base_url: str | None = _opt(_str, env=("OPENAI_BASE_URL",))
    backend: str | None = _opt(_choice("auto", "openai", "local"))
    home: str | None = _opt(_str)
    # data preparation (data_process.cfg)
    sys_prompt: str | None = _opt(_str)
    task_type: str | None = _opt(_choice("answering", "classification"))
    label_format: str | None = _opt(_choice("seed", "json", "comma"))
    # training (train.cfg)
    training_file: str | None = _opt(_str)
    validation_file: str | None = _opt(_str)
    model: str | None = _opt(_str)
    n_epochs: int | str | None = _opt(_int_or_auto(1, 50))
    batch_size: int | str | None = _opt(_int_or_auto(1, 256))
    learning_rate_multiplier: float | str | None = _opt(_positive_float_or_auto)
    suffix: str | None = _opt(_str)
    seed: int | None = _opt(_seed)
    validate_first: bool | None = _opt(_bool)
    # local engine (ignored by the openai backend)
    local_base_model: str | None = _opt(_str)
    training_type: str | None = _opt(_choice("lora", "full"))
    lora_r: int | None = _opt(_positive_int)
    lora_alpha: int | None = _opt(_positive_int)
    lora_dropout: float | None = _opt(_float_range(0.0, 0.9))
    lora_target_modules: list[str] | None = _opt(lambda t: [x.strip() for x in t.split(",") if x.strip()])
    checkpoint_every_steps: int | None = _opt(_positive_int)
    log_every_steps: int | None = _opt(_positive_int)
    num_processes: int | None = _opt(_positive_int)
    max_length: int | None = _opt(_positive_int)
    torch_compile: bool | None = _opt(_bool)
    gradient_checkpointing: bool | None = _opt(_bool)  # unset: on when the memory plan needs it
    memory_limit_gb: float | None = _opt(_float_range(0.5, 100_000.0))
    micro_batch_tokens: int | None = _opt(_positive_int)
    # inference (infer.cfg)
    ft_job_id: str | None = _opt(_str)
    max_tokens: int | None = _opt(_positive_int)
    temperature: float | None = _opt(_float_range(0.0, 2.0))
    user_input: str | None = _opt(_str)
    # listing (jobs list, events)
    limit: int | None = _opt(_positive_int)
    # moving off OpenAI (migrate): the day taken as today, and a file of shutdown dates
    today: str | None = _opt(_date)
    shutdown_table: str | None = _opt(_str)
    # the server (serve)
    server_api_keys: list[str] | None = _opt(lambda t: [x.strip() for x in t.split(",") if x.strip()], secret=True)
    server_allowed_hosts: list[str] | None = _opt(lambda t: [x.strip() for x in t.split(",") if x.strip()])
    server_cors_origins: list[str] | None = _opt(lambda t: [x.strip() for x in t.split(",") if x.strip()])
    max_queue: int | None = _opt(_positive_int)
    max_upload_mb: float | None = _opt(_float_range(0.001, 1_000_000.0))
    # where each value came from: key -> "flag --x", "file.cfg:3", "env VAR", "default"
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def origin(self, key: str) -> str:
        return self.origins.get(key, "default")

    def api_key_display(self) -> str:
        return redact(self.openai_api_key)


KEYS: frozenset[str] = frozenset(f.name for f in fields(Settings) if f.name != "origins")
DEFAULTS: dict[str, Any] = {"backend": "auto", "task_type": "answering", "label_format": "seed", "validate_first": True}


def default_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("GPT_FINETUNE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".gpt-finetune"


def redact(secret: str | None) -> str:
    """Show enough of a key to recognise it, never the whole: ``sk-...wxyz``."""
    if not secret:
        return "(none)"
    if len(secret) <= 8:
        return "***"
    return f"{secret[:3]}...{secret[-4:]}"


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    default_config: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> Settings:
    """Resolve settings by precedence. ``flags`` holds already-typed values (None means unset);
    file and environment values are parsed here, and a bad one raises ConfigError naming it."""
    env = os.environ if env is None else env
    warn = warn or (lambda _msg: None)
    layers: list[tuple[str, dict[str, tuple[str, str]]]] = []  # lowest precedence first

    if default_config is None:
        default_config = default_home(env) / "config.cfg"
    if Path(default_config).is_file() and Path(default_config) != (Path(config_file) if config_file else None):
        layers.append(("default config", _cfg_layer(default_config, warn)))

    env_layer: dict[str, tuple[str, str]] = {}
    for f in fields(Settings):
        if f.name == "origins":
            continue
        for var in (*f.metadata["env"], "GPT_FINETUNE_" + f.name.upper()):
            if env.get(var):
                env_layer[f.name] = (env[var], f"environment variable {var}")
    layers.append(("env", env_layer))

    if config_file is not None:
        layers.append(("config", _cfg_layer(config_file, warn)))

    settings = Settings()
    for key, value in DEFAULTS.items():
        setattr(settings, key, value)
    by_name = {f.name: f for f in fields(Settings)}
    for _layer_name, layer in layers:
        for key, (text, origin) in layer.items():
            if text == "":
                continue
            try:
                value = by_name[key].metadata["parse"](text)
            except ValueError as exc:
                shown = repr(text) if len(text) <= 80 else repr(text[:80]) + f"... ({len(text):,} characters)"
                raise ConfigError(f"{origin}: {key} = {shown}: {exc}") from None
            setattr(settings, key, value)
            settings.origins[key] = origin
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in by_name:
            raise KeyError(f"unknown setting {key!r}")  # a programming error, not a user error
        setattr(settings, key, value)
        settings.origins[key] = "command line"
    return settings


def _cfg_layer(path: str | Path, warn: Callable[[str], None]) -> dict[str, tuple[str, str]]:
    cfg = read_cfg(path, KEYS)
    for message in cfg.warnings:
        warn(message)
    return {key: (v.value, v.origin) for key, v in cfg.values.items()}


def parse_value(key: str, text: str) -> Any:
    """Parse one value as a config file would; used by argparse ``type=`` so flags share rules."""
    by_name = {f.name: f for f in fields(Settings)}
    return by_name[key].metadata["parse"](text)
