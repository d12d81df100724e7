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
from .contract import (
    AUTO,
    METHODS,
    SEED_MAX,
    TEMPERATURE_RANGE,
    DpoHyperparameters,
    LocalOptions,
    Spec,
    SupervisedHyperparameters,
    spec_of,
)
from .errors import ConfigError

# what the local engine may answer in (``inference_dtype``; local/device.py chooses for auto)
INFERENCE_DTYPES = ("auto", "float32", "bfloat16")

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
    return _positive_float(text, what="a positive number or 'auto'")


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


def _positive_float(text: str, what: str = "a positive number") -> float:
    try:
        value = _number(text)
    except ValueError:
        raise ValueError(f"expected {what}") from None
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _whole_from(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = _whole(text)
        except ValueError:
            raise ValueError("expected a positive whole number" if lo >= 1 else "expected a whole number") from None
        if value < lo:
            raise ValueError(f"must be at least {lo}")
        return value

    return parse


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parser_for(spec: Spec) -> Callable[[str], Any]:
    """The config-file/flag parser of a declared setting (``contract.Spec``)."""
    if spec.kind == "bool":
        return _bool
    if spec.kind == "choice":
        return _choice(*spec.choices)
    if spec.kind == "list":
        return _names
    lo, hi = spec.lo, spec.hi
    if spec.kind == "int":
        if spec.auto and lo is not None and hi is not None:
            return _int_or_auto(int(lo), int(hi))
        if hi is None:
            return _whole_from(int(lo or 0))
    elif spec.lo_open and lo == 0 and hi is None:
        return _positive_float_or_auto if spec.auto else _positive_float
    elif lo is not None and hi is not None and not spec.auto:
        return _float_range(lo, hi)
    elif spec.kind == "float":
        return _declared_float(spec)
    raise TypeError(f"no parser for {spec}")  # a declaration this module cannot read yet


def _declared_float(spec: Spec) -> Callable[[str], Any]:
    """A number (or ``auto``, where declared) within the declaration's bounds: DPO's beta."""

    def parse(text: str) -> Any:
        text = text.strip()
        if spec.auto and text == AUTO:
            return AUTO
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected {spec.describe()}") from None
        return spec.check(value)

    return parse


_positive_int = _whole_from(1)


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


def _declared(group: Any, name: str) -> Any:
    """A setting whose rules a contract group declares (the hyperparameters)."""
    f = next(f for f in group.declared() if f[0] == name)[1]
    return _opt(parser_for(spec_of(f)))


# the local training options: declared in contract.LocalOptions, read into ``Settings.local``
LOCAL_KEYS: dict[str, Callable[[str], Any]] = {
    key: parser_for(spec_of(f)) for key, (_group, f) in LocalOptions.keys().items()
}


@dataclass
class Settings:
    """Every setting any command reads. Names are the seed's config keys."""

    # where to send jobs
    openai_api_key: str | None = _opt(_str, env=("OPENAI_API_KEY",), secret=True)
    base_url: str | None = _opt(_str, env=("OPENAI_BASE_URL",))
    backend: str | None = _opt(_choice("auto", "openai", "local"))
    home: str | None = _opt(_str)
    # the store: a PostgreSQL URL shared by several machines (default: SQLite in the home)
    store_url: str | None = _opt(_str, secret=True)
    # data preparation (data_process.cfg)
    sys_prompt: str | None = _opt(_str)
    task_type: str | None = _opt(_choice("answering", "classification"))
    label_format: str | None = _opt(_choice("seed", "json", "comma"))
    # training (train.cfg)
    training_file: str | None = _opt(_str)
    validation_file: str | None = _opt(_str)
    model: str | None = _opt(_str)
    n_epochs: int | str | None = _declared(SupervisedHyperparameters, "n_epochs")
    batch_size: int | str | None = _declared(SupervisedHyperparameters, "batch_size")
    learning_rate_multiplier: float | str | None = _declared(SupervisedHyperparameters, "learning_rate_multiplier")
    method: str | None = _opt(_choice(*METHODS))  # OpenAI's training method: supervised (default) or dpo
    beta: float | str | None = _declared(DpoHyperparameters, "beta")  # dpo only
    suffix: str | None = _opt(_str)
    seed: int | None = _opt(_seed)
    validate_first: bool | None = _opt(_bool)
    # local engine (ignored by the openai backend); its training options are ``local`` below
    local_base_model: str | None = _opt(_str)
    model_cache: str | None = _opt(_str)  # where converted base models are kept (default: in the home)
    malloc: str | None = _opt(_str)  # training's allocator: auto, system, or a library's path
    executor: str | None = _opt(_choice("local", "ray"))  # where a worker's jobs train: its own processes, or Ray
    ray_address: str | None = _opt(_str)  # the Ray cluster's job API (http://head:8265)
    ray_gpus: int | None = _opt(_whole_from(0))  # GPUs each training process asks Ray for (0: CPU)
    # inference (infer.cfg)
    ft_job_id: str | None = _opt(_str)
    max_tokens: int | None = _opt(_positive_int)
    temperature: float | None = _opt(_float_range(*TEMPERATURE_RANGE))
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
    max_batch: int | None = _opt(_positive_int)  # sequences one decoding step runs (1: batching off)
    kv_cache_gb: float | None = _opt(_float_range(0.001, 1_000_000.0))
    max_adapters: int | None = _opt(_positive_int)
    # the local engine's weights when it answers (serve, infer, eval, batch): local/device.py
    inference_dtype: str | None = _opt(_choice(*INFERENCE_DTYPES))
    max_upload_mb: float | None = _opt(_float_range(0.001, 1_000_000.0))
    # chat through OpenAI-compatible engines (vLLM): serve is then their gateway
    chat_upstream: list[str] | None = _opt(lambda t: [x.strip() for x in t.split(",") if x.strip()])
    chat_upstream_key: str | None = _opt(_str, secret=True)
    chat_upstream_timeout: float | None = _opt(_float_range(0.1, 86_400.0))
    vllm_lora_dir: str | None = _opt(_str)  # vLLM's LoRA filesystem resolver directory
    vllm_load_adapters: bool | None = _opt(_bool)  # load adapters through the engines' /v1/load_lora_adapter
    vllm_max_lora_rank: int | None = _opt(_positive_int)  # the engines' --max-lora-rank
    debug: bool | None = _opt(_bool)  # tracebacks and debug logs (--debug)
    # local training options given (settings key -> value), each declared in contract.LocalOptions
    local: dict[str, Any] = field(default_factory=dict, repr=False)
    # where each value came from: key -> "flag --x", "file.cfg:3", "env VAR", "default"
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def origin(self, key: str) -> str:
        return self.origins.get(key, "default")

    def api_key_display(self) -> str:
        return redact(self.openai_api_key)

    def value(self, key: str) -> Any:
        """Any setting by its key (a local training option's included); None when unset."""
        if key in LOCAL_KEYS:
            return self.local.get(key)
        if key not in KEYS:
            raise KeyError(f"unknown setting {key!r}")
        return getattr(self, key)

    def local_options(self) -> LocalOptions:
        """The local training options: those given, defaults for the rest."""
        return LocalOptions.from_settings(self.local)


_NOT_KEYS = ("origins", "local")
KEYS: frozenset[str] = frozenset([f.name for f in fields(Settings) if f.name not in _NOT_KEYS] + list(LOCAL_KEYS))
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

    if default_config is None:  # in the data directory given (--home), else the default one
        home = (flags or {}).get("home")
        default_config = (Path(home).expanduser() if home else default_home(env)) / "config.cfg"
    if Path(default_config).is_file() and Path(default_config) != (Path(config_file) if config_file else None):
        layers.append(("default config", _cfg_layer(default_config, warn)))

    env_layer: dict[str, tuple[str, str]] = {}
    for key in sorted(KEYS):
        for var in (*_env_names(key), "GPT_FINETUNE_" + key.upper()):
            if env.get(var):
                env_layer[key] = (env[var], f"environment variable {var}")
    layers.append(("env", env_layer))

    if config_file is not None:
        layers.append(("config", _cfg_layer(config_file, warn)))

    settings = Settings()
    for key, value in DEFAULTS.items():
        setattr(settings, key, value)
    for _layer_name, layer in layers:
        for key, (text, origin) in layer.items():
            if text == "":
                continue
            try:
                value = parse_value(key, text)
            except ValueError as exc:
                shown = repr(text) if len(text) <= 80 else repr(text[:80]) + f"... ({len(text):,} characters)"
                raise ConfigError(f"{origin}: {key} = {shown}: {exc}") from None
            _set(settings, key, value)
            settings.origins[key] = origin
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in KEYS:
            raise KeyError(f"unknown setting {key!r}")  # a programming error, not a user error
        _set(settings, key, value)
        settings.origins[key] = "command line"
    return settings


def _set(settings: Settings, key: str, value: Any) -> None:
    if key in LOCAL_KEYS:
        settings.local[key] = value
    else:
        setattr(settings, key, value)


def _env_names(key: str) -> tuple[str, ...]:
    """Other names of a setting's variable (OPENAI_API_KEY), besides GPT_FINETUNE_<KEY>."""
    f = _FIELDS.get(key)
    return tuple(f.metadata["env"]) if f is not None else ()


def from_env(key: str, env: Mapping[str, str] | None = None) -> Any:
    """One setting from the environment alone (``GPT_FINETUNE_<KEY>``), parsed, else None: for
    what is needed before the rest is read (``debug``, while the command line is parsed)."""
    env = os.environ if env is None else env
    for var in (*_env_names(key), "GPT_FINETUNE_" + key.upper()):
        if env.get(var):
            try:
                return parse_value(key, env[var])
            except ValueError as exc:
                raise ConfigError(f"environment variable {var} = {env[var]!r}: {exc}") from None
    return None


def _cfg_layer(path: str | Path, warn: Callable[[str], None]) -> dict[str, tuple[str, str]]:
    cfg = read_cfg(path, KEYS)
    for message in cfg.warnings:
        warn(message)
    return {key: (v.value, v.origin) for key, v in cfg.values.items()}


_FIELDS = {f.name: f for f in fields(Settings) if f.name not in _NOT_KEYS}


def parse_value(key: str, text: str) -> Any:
    """Parse one value as a config file would; used by argparse ``type=`` so flags share rules."""
    if key in LOCAL_KEYS:
        return LOCAL_KEYS[key](text)
    return _FIELDS[key].metadata["parse"](text)
