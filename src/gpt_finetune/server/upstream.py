"""Chat through upstream engines (``chat_upstream``): ``serve`` stays the gateway (keys, files,
jobs, models, aliases, the request checks) and forwards chat completions to OpenAI-compatible
engines, vLLM being the one documented (README "Serving through vLLM").

What the gateway does for each request:

- checks it as the local engine would (``request_rules.parse_chat``: the same 400s), finds the
  model (aliases and job ids resolve to the model's own id; unknown ones are a 404 here), and
  names it as the upstream knows it: a base model by its id (vLLM's ``--served-model-name``), a
  fine-tuned model or checkpoint by its own id, under which its adapter is published in
  ``vllm_lora_dir`` (vLLM's LoRA filesystem resolver loads it from there on first use), or,
  with ``vllm_load_adapters``, loaded into the chosen engine through its
  ``/v1/load_lora_adapter`` before the first request there (again after the engine forgot it);
- sends it to one upstream, chosen by rendezvous hashing of the model id over the upstreams that
  answer (so an adapter goes to the same engine, whose adapter cache then holds it, while that
  engine is up; when it is not, the next one in that model's order);
- maps what goes wrong to OpenAI's error shapes: no upstream reachable 503, an upstream fault 502,
  no answer within ``chat_upstream_timeout`` 504, the upstream's own 4xx passed through as it
  sent it, and never a hang;
- checks a constrained answer (``structured_outputs.choice`` or ``guided_choice``) against its
  choices: an upstream that ignored the field (an older or newer vLLM than the one that reads
  it) is a 502 ``upstream_ignored_choice``, not a wrong answer passed on.

httpx (already the openai SDK's transport) rather than the SDK itself: the body and the
server-sent events are relayed as the upstream wrote them, which the SDK would parse and rebuild.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from ..errors import BackendError, GptFinetuneError
from ..request_rules import parse_chat

log = logging.getLogger("gpt_finetune.server")
DOWN_SECONDS = 10.0  # an upstream that refused a connection is skipped this long
# vLLM's --max-lora-rank takes these (vllm.config.LoRAConfig); its default is 16
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16


def vllm_adapter_problem(lora_r: int, training_type: str, max_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> str | None:
    """Why vLLM could not load the adapter a job with these settings writes (None: it could),
    by vLLM's documented rules: a LoRA adapter (a full fine-tune is a model of its own, not an
    adapter to load beside the base), of a rank no larger than the engine's ``--max-lora-rank``.
    Target modules: PEFT's "all-linear" and the projection names are the linear layers vLLM's
    LoRA layers replace in Llama-family models, so any the engine accepts here pass."""
    if training_type != "lora":
        return (
            "a full fine-tune is a model of its own, not an adapter vLLM loads beside the base: serve it with "
            "vLLM as its own model, or train with training_type = lora"
        )
    if lora_r > max_rank:
        return f"lora_r {lora_r} is above the upstream's --max-lora-rank {max_rank} (vllm_max_lora_rank)"
    return None


class Upstreams:
    def __init__(
        self,
        urls: list[str],
        *,
        key: str | None = None,
        timeout: float = 600.0,
        lora_dir: str | Path | None = None,
        load_adapters: bool = False,
    ) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.key = key
        self.timeout = timeout
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.load_adapters = load_adapters
        self._adapters: dict[str, str] = {}  # upstream model name -> the adapter's path, as engines read it
        self._loaded: set[tuple[str, str]] = set()  # (upstream, model name) loaded through the endpoint
        self._down: dict[str, float] = {}  # url -> until (time.monotonic)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=5.0),
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )

    async def close(self) -> None:
        await self._client.aclose()

    def unreachable(self) -> list[str]:
        """The upstreams that refused a connection in the last ``DOWN_SECONDS``."""
        now = time.monotonic()
        return [u for u in self.urls if self._down.get(u, 0.0) > now]

    def order(self, model: str) -> list[str]:
        """The upstreams in this model's order (rendezvous hashing): the first that answers takes
        it; adding or removing an upstream moves only the models that hashed to it."""

        def weight(url: str) -> bytes:
            return hashlib.sha256(f"{url}\n{model}".encode()).digest()

        ranked = sorted(self.urls, key=weight, reverse=True)
        now = time.monotonic()
        up = [u for u in ranked if self._down.get(u, 0.0) <= now]
        return up + [u for u in ranked if u not in up]  # the ones marked down last, not never

    # ---- naming and publishing ---------------------------------------------------------------
    def upstream_model(self, services: Any, requested: str) -> str:
        """The name the upstream serves ``requested`` under, publishing its adapter first."""
        base, path = services.models.locate(requested)  # a 404 for an unknown model
        base_name = Path(base).name if os.sep in base else base  # a base given as a directory: its name
        if path is None:
            return base_name
        model_id = str(services.models.resolve(requested))
        if (Path(path) / "adapter_config.json").exists():
            # a fully trained model has no adapter: the upstream serves it under its id itself
            where = Path(path)
            if self.lora_dir is not None:
                self._publish(model_id, where, base_name)
                where = self.lora_dir / model_id
            self._adapters[model_id] = str(where)
        return model_id

    def _publish(self, model_id: str, adapter: Path, base_name: str) -> None:
        """The adapter under ``lora_dir/model_id`` as vLLM's filesystem resolver reads it: its
        ``adapter_config.json`` naming the base as the upstream serves it. Written to a temporary
        directory and renamed, so an engine never loads half an adapter."""
        assert self.lora_dir is not None
        target = self.lora_dir / model_id
        if (target / "adapter_config.json").exists():
            return
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.lora_dir / f".{model_id}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (adapter / name).exists():
                shutil.copy2(adapter / name, tmp / name)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_name  # the resolver loads it only for that base
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process published it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- forwarding ------------------------------------------------------------------------
    def prepare(self, services: Any, body: Any) -> tuple[dict[str, Any], str, list[str] | None]:
        """The checked body for the upstream, the requested model, and the choices its answer
        must be one of."""
        parsed = parse_chat(body)
        if parsed["label_choice"] is not None:
            raise BackendError(
                "label_choice is answered by the local engine; through an upstream, send "
                "structured_outputs: {choice: [...]} with the labels as the model writes them",
                code="unsupported_value",
                param="label_choice",
                status=400,
            )
        out = dict(body)
        out["model"] = self.upstream_model(services, parsed["model"])
        return out, parsed["model"], parsed["choices"]

    async def _load(self, url: str, name: str, path: str) -> None:
        """Load an adapter into one engine through vLLM's ``/v1/load_lora_adapter`` (vLLM answers
        200 and a line of text; 400 "has already been loaded" when it has it, which another
        gateway, or this one before a restart, may have done; 404 "No adapter found" for a path
        it cannot read; the route itself is a 404 unless the engine runs with
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
        response = await self._client.post(url + "/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        text = response.text
        if response.status_code == 200 or (response.status_code == 400 and "already been loaded" in text):
            self._loaded.add((url, name))
            return
        if response.status_code in (404, 405) and "adapter" not in text.lower():
            raise BackendError(
                f"the chat upstream {url} has no /load_lora_adapter: start vLLM with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or leave vllm_load_adapters off and use its filesystem "
                "resolver on vllm_lora_dir",
                code="upstream_error",
                status=502,
            )
        try:
            error = response.json()
            message = str((error.get("error") or {}).get("message") or error.get("message") or text)
        except (ValueError, AttributeError):
            message = text
        raise BackendError(
            f"the chat upstream could not load the adapter of {name} from {path} (HTTP "
            f"{response.status_code}): {message[:200]}",
            code="upstream_error",
            status=502,
        )

    async def _post(self, url: str, body: dict[str, Any], stream: bool) -> httpx.Response:
        """One chat request to one engine, its adapter loaded there first when the gateway loads
        them; an engine that no longer knows an adapter it was given (restarted) gets it again."""
        name = str(body.get("model"))
        adapter = self._adapters.get(name) if self.load_adapters else None
        given = adapter is not None and (url, name) in self._loaded
        if adapter is not None and not given:
            await self._load(url, name, adapter)
        request = self._client.build_request("POST", url + "/chat/completions", json=body)
        response = await self._client.send(request, stream=stream)
        if response.status_code == 404 and given:
            await response.aclose()
            self._loaded.discard((url, name))
            log.info("chat upstream %s no longer has %s: loading it again", url, name)
            await self._load(url, name, str(adapter))
            request = self._client.build_request("POST", url + "/chat/completions", json=body)
            response = await self._client.send(request, stream=stream)
        return response

    async def _send(self, body: dict[str, Any], model: str, *, stream: bool) -> httpx.Response:
        last: Exception | None = None
        for url in self.order(model):
            try:
                response = await self._post(url, body, stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self._down[url] = time.monotonic() + DOWN_SECONDS
                log.warning("chat upstream %s did not answer (%s); trying the next", url, type(exc).__name__)
                last = exc
                continue
            except httpx.TimeoutException as exc:
                raise BackendError(
                    f"the chat upstream did not answer within {self.timeout:g} s",
                    code="upstream_timeout",
                    status=504,
                ) from exc
            except httpx.HTTPError as exc:
                raise BackendError(
                    f"the chat upstream failed: {type(exc).__name__}", code="upstream_error", status=502
                ) from exc
            self._down.pop(url, None)
            if response.status_code >= 400:
                await self._raise_for(response)
            return response
        raise BackendError(
            f"no chat upstream is reachable ({len(self.urls)} configured)",
            code="upstream_unavailable",
            status=503,
        ) from last

    async def _raise_for(self, response: httpx.Response) -> None:
        raw = await response.aread()
        await response.aclose()
        try:
            error = json.loads(raw)["error"]
            message = str(error.get("message") or error)
        except (ValueError, KeyError, TypeError, AttributeError):
            error, message = None, raw[:200].decode(errors="replace") or response.reason_phrase
        if 400 <= response.status_code < 500:  # the request's fault: the client's to see, as the upstream said it
            raise UpstreamError(response.status_code, error if isinstance(error, dict) else None, message)
        raise BackendError(
            f"the chat upstream failed (HTTP {response.status_code}): {message}", code="upstream_error", status=502
        )

    async def complete(self, body: dict[str, Any], model: str, choices: list[str] | None) -> dict[str, Any]:
        response = await self._send(body, model, stream=False)
        try:
            answer = response.json()
            assert isinstance(answer, dict) and isinstance(answer.get("choices"), list)
        except (ValueError, AssertionError):
            raise BackendError(
                "the chat upstream sent an answer that is not a chat completion", code="upstream_error", status=502
            ) from None
        if choices is not None:
            for choice in answer["choices"]:
                content = (choice.get("message") or {}).get("content")
                if content not in choices:
                    raise BackendError(
                        f"the chat upstream answered {str(content)[:80]!r}, not one of the choices: it ignored the "
                        "choice field (vLLM reads structured_outputs from v0.10, guided_choice before v0.12)",
                        code="upstream_ignored_choice",
                        status=502,
                    )
        answer["model"] = model  # the name the client asked for, as the local engine answers
        return answer

    async def stream(self, body: dict[str, Any], model: str, choices: list[str] | None) -> AsyncIterator[str]:
        """The upstream's server-sent events, relayed line by line (the model renamed back); the
        first is awaited before the caller sends its headers, so a refusal is an HTTP error."""
        response = await self._send(body, model, stream=True)
        lines = response.aiter_lines()
        text: list[str] = []

        async def relay() -> AsyncIterator[str]:
            try:
                async for line in lines:
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data.strip() == "[DONE]":
                        if choices is not None and "".join(text) not in choices:
                            error = {
                                "error": {
                                    "message": "the chat upstream ignored the choice field",
                                    "type": "server_error",
                                    "param": None,
                                    "code": "upstream_ignored_choice",
                                }
                            }
                            yield f"data: {json.dumps(error)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue
                    if isinstance(chunk, dict) and "model" in chunk:
                        chunk["model"] = model
                        for c in chunk.get("choices") or []:
                            text.append((c.get("delta") or {}).get("content") or "")
                    yield f"data: {json.dumps(chunk)}\n\n"
            except httpx.HTTPError as exc:  # a timeout, a connection cut, a broken chunk mid-stream
                error = {
                    "error": {
                        "message": f"the chat upstream stopped answering ({type(exc).__name__})",
                        "type": "server_error",
                        "param": None,
                        "code": "upstream_timeout" if isinstance(exc, httpx.TimeoutException) else "upstream_error",
                    }
                }
                yield f"data: {json.dumps(error)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await response.aclose()

        return relay()


class UpstreamError(GptFinetuneError):
    """An upstream's 4xx, passed on with its status and error object."""

    type = "invalid_request_error"

    def __init__(self, status: int, error: dict[str, Any] | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error

    def to_openai(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": None}}
