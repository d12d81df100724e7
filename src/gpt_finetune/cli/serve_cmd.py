"""``serve``: the OpenAI-compatible server over the local backend."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import socket

from ..errors import ConfigError, DependencyError
from ..settings import redact
from .common import add_config_flag, add_dtype_flag, info, settings_from, typed, warn

DEFAULT_PORT = 8000
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def add_serve(p: argparse.ArgumentParser) -> None:
    add_config_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help="a key clients must send as 'Authorization: Bearer KEY' (repeatable; or server_api_keys in the "
        "config, or GPT_FINETUNE_SERVER_API_KEYS=k1,k2); required unless the server binds to loopback",
    )
    p.add_argument(
        "--allowed-host",
        dest="server_allowed_hosts",
        action="append",
        metavar="NAME",
        help="a Host name to answer besides loopback names (repeatable; server_allowed_hosts = a,b); "
        "bound elsewhere than loopback, only these are answered when given",
    )
    p.add_argument(
        "--cors-origin",
        dest="server_cors_origins",
        action="append",
        metavar="ORIGIN",
        help="a web origin (https://app.example) whose pages may call the server (repeatable; "
        "server_cors_origins = ...); none by default",
    )
    p.add_argument(
        "--max-queue", dest="max_queue", type=typed("max_queue"), help="chat requests that may wait (default 64)"
    )
    p.add_argument(
        "--max-batch",
        dest="max_batch",
        type=typed("max_batch"),
        help="sequences decoded together in one step, per model (default 16; 1 turns batching off)",
    )
    p.add_argument(
        "--kv-cache-gb",
        dest="kv_cache_gb",
        type=typed("kv_cache_gb"),
        help="memory the running batches' keys and values may take (default: a quarter of the memory free "
        "at start, half of the GPU's)",
    )
    p.add_argument(
        "--max-adapters",
        dest="max_adapters",
        type=typed("max_adapters"),
        help="fine-tuned adapters kept loaded; past it the least recently used idle one goes (default 8)",
    )
    add_dtype_flag(p)
    p.add_argument(
        "--max-upload-mb", dest="max_upload_mb", type=typed("max_upload_mb"), help="largest file upload (default 512)"
    )
    p.add_argument(
        "--chat-upstream",
        dest="chat_upstream",
        action="append",
        metavar="URL",
        help="an OpenAI-compatible engine (vLLM) that answers chat: http://gpu1:8000/v1 (repeatable; "
        "chat_upstream = a,b); this server stays the gateway for keys, files, jobs and models",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def _access_log(level: str) -> None:
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    for name in ("gpt_finetune.server.access", "gpt_finetune.server"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.addHandler(handler)
        logger.propagate = False


def cmd_serve(ns: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..backends.local import open_services
        from ..server import ServerConfig, create_app
        from ..server.app import MIN_KEY_LENGTH
    except ImportError as exc:
        raise DependencyError(
            f"the server is not installed ({exc.name} is missing)", hint="pip install 'gpt-finetune[server,local]'"
        ) from None
    if ns.api_keys:
        warn("API keys given on the command line are visible to other users of this machine; prefer the config file")
    s = settings_from(ns)
    keys = list(ns.api_keys or s.server_api_keys or [])
    for key in keys:
        if len(key) < MIN_KEY_LENGTH or any(not c.isprintable() or c.isspace() for c in key):
            raise ConfigError(
                f"API key {redact(key)} is too short or has spaces or control characters: "
                f"a server key needs at least {MIN_KEY_LENGTH} printable characters",
                hint="make one with: python3 -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(24))'",
            )
    if not keys and not is_loopback(ns.host):
        raise ConfigError(
            f"refusing to serve on {ns.host} without an API key: anyone who can reach it could train and use models",
            hint="give --api-key KEY (or server_api_keys in the config), or bind to 127.0.0.1",
        )
    if not 0 <= ns.port <= 65535:
        raise ConfigError(f"--port {ns.port}: must be from 0 to 65535")
    config = ServerConfig(
        api_keys=keys,
        loopback=is_loopback(ns.host),
        allowed_hosts=list(s.server_allowed_hosts or []),
        cors_origins=list(s.server_cors_origins or []),
        job_options=s.local_options(),
    )
    if s.max_upload_mb:
        config.max_upload_bytes = int(s.max_upload_mb * (1 << 20))
    if s.chat_upstream:
        from ..server.upstream import VLLM_DEFAULT_MAX_LORA_RANK, Upstreams

        for url in s.chat_upstream:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"chat_upstream {url!r}: an http:// or https:// URL, such as http://gpu1:8000/v1")
        config.upstreams = Upstreams(
            list(s.chat_upstream),
            key=s.chat_upstream_key,
            timeout=s.chat_upstream_timeout or 600.0,
            lora_dir=s.vllm_lora_dir,
            load_adapters=bool(s.vllm_load_adapters),
        )
        config.vllm_max_lora_rank = s.vllm_max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
        if not s.vllm_lora_dir and not s.vllm_load_adapters:
            warn(
                "chat_upstream without vllm_lora_dir: fine-tuned models are sent by name, and each engine must "
                "already have their adapters (vLLM: --lora-modules, or its filesystem resolver's directory)"
            )
    engine_options = {
        "max_batch": s.max_batch,
        "kv_cache_gb": s.kv_cache_gb,
        "max_adapters": s.max_adapters,
        "dtype": s.inference_dtype,
    }
    services = open_services(s, max_queue=s.max_queue, engine_options=engine_options, name_paths=False)
    services.jobs.kick()  # resume what a dead worker left
    app = create_app(services, config)
    shown = ", ".join(redact(k) for k in keys) if keys else "none (loopback only)"
    info(f"Serving OpenAI's API at http://{ns.host}:{ns.port}/v1 (data in {services.home.root}; API keys: {shown})")
    if importlib.util.find_spec("torch") is not None:  # the engine's scheduling, before any request
        info(f"Local models: {services.chat.engine.describe()}")
    _access_log(ns.log_level)
    # uvicorn's own access log would write query strings (a key sent as ?api_key=) and raw
    # control characters; the server's guards write one that redacts and escapes them
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, timeout_graceful_shutdown=5, access_log=False)
    return 0
