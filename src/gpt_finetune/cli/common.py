"""What every command shares: messages, settings from flags, choosing a backend."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..errors import BackendError, ConfigError
from ..settings import KEYS, Settings, load_settings, parse_value


def warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


def info(message: str) -> None:
    print(message, file=sys.stderr)


def typed(key: str, flag: str | None = None) -> Any:
    """An argparse ``type=`` that parses a flag as the config file would, naming the flag.

    A bad value raises ConfigError, which argparse does not catch: it reaches the CLI's one
    error handler and gives the same ``Error:`` line and exit code 1 as a bad config value
    (argparse's usage message and exit 2 stay for usage mistakes: unknown or missing flags)."""

    def parse(text: str) -> Any:
        try:
            return parse_value(key, text)
        except ValueError as exc:
            raise ConfigError(f"{flag or '--' + key.replace('_', '-')} {text!r}: {exc}") from None

    parse.__name__ = key
    return parse


def declared_help(spec: Any) -> str:
    """A flag's help from its declaration (``contract.Spec``): what it does and what it takes."""
    if spec.kind == "choice":
        takes = " or ".join(spec.choices)
    elif spec.kind == "bool":
        takes = "true or false"
    elif spec.kind == "list":
        takes = "comma-separated names"
    elif spec.lo is not None and spec.hi is not None:
        takes = f"{spec.lo:g}..{spec.hi:g}"
    elif spec.lo is not None:
        takes = f"> {spec.lo:g}" if spec.lo_open else f">= {spec.lo:g}"
    else:
        takes = "a number"
    return f"{spec.help}: {takes}" + (" or auto" if spec.auto else "")


def add_hyperparameter_flags(p: argparse.ArgumentParser) -> None:
    """OpenAI's hyperparameters as flags (--n-epochs, ...), from their declarations."""
    from ..contract import METHODS, DpoHyperparameters, spec_of

    p.add_argument(
        "--method",
        dest="method",
        choices=METHODS,
        help="OpenAI's training method: supervised (chat examples, the default) or dpo (preference pairs)",
    )
    for key, f in DpoHyperparameters.declared():  # the supervised three and dpo's beta
        extra = " (method dpo only)" if key == "beta" else ""
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typed(key), help=declared_help(spec_of(f)) + extra)


def add_local_option_flags(p: argparse.ArgumentParser) -> None:
    """Every declared local training option as a flag (--lora-r 16, --max-length 4096, ...):
    the same keys as the config file, parsed by the same rules. Ignored by the openai backend."""
    from ..contract import LocalOptions, spec_of

    g = p.add_argument_group("local engine (config keys of the same names; ignored by the openai backend)")
    for key, (_group, f) in LocalOptions.keys().items():
        spec = spec_of(f)
        if spec.flag:
            flag = "--" + key.replace("_", "-")
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(default)
            elif isinstance(default, bool):
                default = str(default).lower()
            shown = "" if default is None else f" (default {default})"
            g.add_argument(flag, dest=key, type=typed(key, flag), metavar="VALUE", help=declared_help(spec) + shown)


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    """``--dtype``: the local engine's weights when it answers (``inference_dtype``)."""
    p.add_argument(
        "--dtype",
        dest="inference_dtype",
        metavar="DTYPE",
        type=typed("inference_dtype", "--dtype"),
        help="the local engine's weights: auto (bf16 on a GPU that has it, float32 elsewhere), float32 or "
        "bfloat16 (faster on a CPU with AVX512-BF16 or AMX; answers may differ on near ties)",
    )


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="a 'key = value' config file (the seed's .cfg files)")


def add_connection_flags(
    p: argparse.ArgumentParser, key_flags: tuple[str, ...] = ("-k", "--key"), *, choose_backend: bool = True
) -> None:
    g = p.add_argument_group("backend")
    g.add_argument(*key_flags, dest="openai_api_key", metavar="KEY", help="OpenAI API key (prefer OPENAI_API_KEY)")
    g.add_argument("--base-url", dest="base_url", metavar="URL", help="an OpenAI-compatible API base URL")
    if not choose_backend:
        return
    g.add_argument(
        "--backend",
        type=typed("backend"),
        help="local trains on this machine; openai calls OpenAI or --base-url; "
        "auto (default): openai when a key or base URL is configured, else local",
    )


def settings_from(ns: argparse.Namespace) -> Settings:
    flags = {k: getattr(ns, k) for k in KEYS if hasattr(ns, k)}
    if flags.get("openai_api_key"):
        warn("an API key given on the command line is visible to other users of this machine; prefer OPENAI_API_KEY")
    settings = load_settings(flags, config_file=getattr(ns, "config", None), warn=warn)
    return settings


def get_backend(settings: Settings, *, announce: bool = True) -> Backend:
    choice = settings.backend or "auto"
    if choice == "auto":
        choice = "openai" if (settings.openai_api_key or settings.base_url) else "local"
        if choice == "local":
            from ..base_catalog import missing_engine_packages

            missing = missing_engine_packages()
            if missing:  # only the core is installed (the seed's pip3 install -r requirements.txt)
                raise ConfigError(
                    f"no OpenAI API key is set, and the local engine is not installed (missing: {', '.join(missing)})",
                    hint="set OPENAI_API_KEY (or -k KEY) to use OpenAI, or install the local engine: "
                    "pip install 'gpt-finetune[local]' (README, Set-up)",
                )
    if choice == "openai":
        from ..backends.openai_backend import OpenAIBackend

        backend: Backend = OpenAIBackend(settings.openai_api_key, settings.base_url)
    else:
        from ..backends.local import LocalBackend

        backend = LocalBackend.from_settings(settings)
    if announce:
        info(f"Using the {backend.describe()}")
    return backend


def require(value: Any, what: str, hint: str) -> Any:
    if value in (None, ""):
        raise ConfigError(f"no {what}", hint=hint)
    return value


def plot_job(backend: Any, job_id: str, out: str | Path, title: str) -> Path:
    """Draw a job's loss and accuracy curves from its metrics events (oldest first) as a PNG."""
    from ..curves import plot_metrics

    events = backend.list_events(job_id, limit=10_000)
    data = [e.data for e in reversed(events) if e.type == "metrics" and isinstance(e.data, dict)]
    if not data:
        raise BackendError(f"job {job_id} has no metrics yet")
    return plot_metrics(data, out, title=title)
