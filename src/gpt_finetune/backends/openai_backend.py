"""The ``openai`` backend: the official SDK against OpenAI or any compatible base URL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
from openai.types import FileObject, Model
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from ..contract import JobSpec, LabelSets
from ..errors import BackendError, ConfigError, GptFinetuneError, NotFoundError
from ..request_rules import check_names
from ..settings import redact
from .base import Hyperparameters, Traits

T = TypeVar("T")

# Tests replace this with a factory of clients on a mock transport (httpx's transport seam).
http_client_factory: Callable[[], Any] | None = None
MAX_RETRIES = 2  # the SDK's own retries (with back-off, honouring Retry-After) of 408, 409, 429, 5xx and drops


class OpenAIBackend:
    name = "openai"
    traits = Traits(batched_chat=False, guided_choice=False, concurrency=4)

    def __init__(
        self, api_key: str | None, base_url: str | None = None, *, client: openai.OpenAI | None = None
    ) -> None:
        if client is None:
            if not api_key and base_url:
                api_key = "unused"  # a self-hosted compatible server may need no key; the SDK wants one
            if not api_key:
                raise ConfigError(
                    "no OpenAI API key",
                    hint="pass -k/--key, set openai_api_key in the -c config file, or export OPENAI_API_KEY",
                )
            client = openai.OpenAI(
                api_key=api_key,
                base_url=base_url or None,
                max_retries=MAX_RETRIES,
                http_client=http_client_factory() if http_client_factory else None,
            )
        self.client = client
        self.api_key = api_key
        self.base_url = str(client.base_url)

    def describe(self) -> str:
        return f"openai backend at {self.base_url} (key {redact(self.api_key)})"

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except openai.AuthenticationError as exc:
            raise BackendError(
                f"{what}: the server refused the API key {redact(self.api_key)} ({_message(exc)})",
                hint="check -k/--key, openai_api_key in the config, or OPENAI_API_KEY",
                code="invalid_api_key",
            ) from None
        except openai.NotFoundError as exc:
            raise NotFoundError(f"{what}: {_message(exc)}", code=_code(exc) or "not_found") from None
        except openai.PermissionDeniedError as exc:
            code = _code(exc)
            hint = None
            if code == "training_not_available":
                hint = "OpenAI no longer accepts new fine-tuning jobs; train locally with --backend local"
            raise BackendError(f"{what}: {_message(exc)}", hint=hint, code=code or "permission_denied") from None
        except openai.RateLimitError as exc:
            retry = exc.response.headers.get("retry-after")
            error = BackendError(
                f"{what}: rate limited (HTTP 429): {_message(exc)}",
                hint=f"wait {retry} s and try again" if retry else "wait a little and try again",
                code=_code(exc) or "rate_limit_exceeded",
                status=429,
            )
            error.retry_after = _seconds(retry)
            raise error from None
        except openai.InternalServerError as exc:
            raise BackendError(
                f"{what}: the server failed (HTTP {exc.status_code}): {_message(exc)}",
                hint="a fault on the server's side, retried already; try again later",
                code=_code(exc) or "server_error",
            ) from None
        except openai.APIStatusError as exc:
            raise BackendError(f"{what}: HTTP {exc.status_code}: {_message(exc)}", code=_code(exc)) from None
        except openai.APIConnectionError:
            raise BackendError(
                f"{what}: cannot reach {self.base_url} (or it dropped the connection)",
                hint="check the network, or the base URL (--base-url, base_url in the config, OPENAI_BASE_URL)",
                code="connection_error",
            ) from None
        except ValueError as exc:  # the SDK refuses a request before sending it (an empty id)
            raise BackendError(f"{what}: {exc}", code="invalid_request") from None

    # files
    def upload_file(self, path: Path, purpose: str = "fine-tune") -> FileObject:
        from ..data.readers import open_input

        with open_input(path) as fh:
            return self._call(lambda: self.client.files.create(file=(path.name, fh), purpose=purpose), f"upload {path}")  # type: ignore[arg-type]

    def list_files(self) -> list[FileObject]:
        return self._call(lambda: list(self.client.files.list()), "list files")

    def retrieve_file(self, file_id: str) -> FileObject:
        return self._call(lambda: self.client.files.retrieve(file_id), f"file {file_id}")

    def delete_file(self, file_id: str) -> bool:
        return self._call(lambda: self.client.files.delete(file_id).deleted, f"delete file {file_id}")

    def file_content(self, file_id: str) -> bytes:
        """A file's bytes. OpenAI refuses those of files uploaded for fine-tuning (a BackendError)."""
        return self._call(lambda: self.client.files.content(file_id).read(), f"content of file {file_id}")

    def upload_bytes(self, filename: str, data: bytes, purpose: str) -> FileObject:
        return self._call(
            lambda: self.client.files.create(file=(filename, data), purpose=purpose),  # type: ignore[arg-type]
            f"upload {filename}",
        )

    # batches (OpenAI's Batch API: half the price, answered within 24 h)
    def create_batch(self, input_file_id: str, *, metadata: dict[str, str] | None = None) -> Any:
        return self._call(
            lambda: self.client.batches.create(
                input_file_id=input_file_id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata=metadata,
            ),
            "create batch",
        )

    def retrieve_batch(self, batch_id: str) -> Any:
        return self._call(lambda: self.client.batches.retrieve(batch_id), f"batch {batch_id}")

    def list_batches(self) -> list[Any]:
        return self._call(lambda: list(self.client.batches.list(limit=100)), "list batches")

    # jobs
    def check_job(self, *, model: str, suffix: str | None = None, seed: int | None = None) -> None:
        """OpenAI checks the model itself; what its documented limits refuse is refused here first."""
        if not model:
            raise BackendError("no model name", code="invalid_model")
        check_names(suffix=suffix, seed=seed)

    def create_job(
        self,
        *,
        model: str,
        training_file: str,
        validation_file: str | None = None,
        hyperparameters: Hyperparameters | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        metadata: dict[str, str] | None = None,
        method: str = "supervised",
    ) -> FineTuningJob:
        kwargs: dict[str, Any] = {"model": model, "training_file": training_file}
        if metadata:
            kwargs["metadata"] = metadata
        if validation_file:
            kwargs["validation_file"] = validation_file
        hp = hyperparameters.explicit() if hyperparameters else {}
        if hp or method != "supervised":  # the method as OpenAI takes it, unchanged
            kwargs["method"] = {"type": method, method: {"hyperparameters": hp}}
        if suffix:
            kwargs["suffix"] = suffix
        if seed is not None:
            kwargs["seed"] = seed
        return self._call(lambda: self.client.fine_tuning.jobs.create(**kwargs), "create fine-tuning job")

    def retrieve_job(self, job_id: str) -> FineTuningJob:
        return self._call(lambda: self.client.fine_tuning.jobs.retrieve(job_id), f"job {job_id}")

    def list_jobs(
        self, *, limit: int = 20, after: str | None = None, metadata: dict[str, str] | None = None
    ) -> list[FineTuningJob]:
        kwargs: dict[str, Any] = {"limit": limit}
        if after:
            kwargs["after"] = after
        if metadata:
            kwargs["metadata"] = metadata
        return self._call(lambda: list(self.client.fine_tuning.jobs.list(**kwargs).data), "list jobs")

    def list_all_jobs(self) -> list[FineTuningJob]:
        """Every job of the organisation, newest first: the SDK follows ``has_more`` page by page."""
        return self._call(lambda: list(self.client.fine_tuning.jobs.list(limit=100)), "list jobs")

    def cancel_job(self, job_id: str) -> FineTuningJob:
        return self._call(lambda: self.client.fine_tuning.jobs.cancel(job_id), f"cancel job {job_id}")

    def pause_job(self, job_id: str) -> FineTuningJob:
        return self._call(lambda: self.client.fine_tuning.jobs.pause(job_id), f"pause job {job_id}")

    def resume_job(self, job_id: str) -> FineTuningJob:
        return self._call(lambda: self.client.fine_tuning.jobs.resume(job_id), f"resume job {job_id}")

    def list_events(self, job_id: str, *, limit: int = 100, after: str | None = None) -> list[FineTuningJobEvent]:
        kwargs: dict[str, Any] = {"limit": limit}
        if after:
            kwargs["after"] = after
        return self._call(
            lambda: list(self.client.fine_tuning.jobs.list_events(job_id, **kwargs).data), f"events of {job_id}"
        )

    def list_checkpoints(self, job_id: str) -> list[Any]:
        return self._call(
            lambda: list(self.client.fine_tuning.jobs.checkpoints.list(job_id).data), f"checkpoints of {job_id}"
        )

    # models
    def list_models(self) -> list[Model]:
        return self._call(lambda: list(self.client.models.list()), "list models")

    def retrieve_model(self, model_id: str) -> Model:
        return self._call(lambda: self.client.models.retrieve(model_id), f"model {model_id}")

    def delete_model(self, model_id: str) -> bool:
        return self._call(lambda: self.client.models.delete(model_id).deleted, f"delete model {model_id}")

    def add_alias(self, alias: str, model_id: str, *, replace: bool = False) -> Model:
        raise _no_aliases()

    def remove_alias(self, alias: str) -> bool:
        raise _no_aliases()

    # inference
    def chat(self, *, model: str, messages: list[dict[str, Any]], stream: bool = False, **params: Any) -> Any:
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": messages,
            **{k: v for k, v in params.items() if v is not None},
        }
        if stream:
            kwargs["stream"] = True
        response = self._call(lambda: self.client.chat.completions.create(**kwargs), f"chat with {model}")
        if not stream:
            return response
        return self._stream_chunks(response, model)

    def chat_many(
        self, requests: list[dict[str, Any]], *, batch_size: int = 8
    ) -> list[dict[str, Any] | GptFinetuneError]:
        """One by one: OpenAI batches on its side (its Batch API is ``migrate record --batch-api``)."""
        out: list[dict[str, Any] | GptFinetuneError] = []
        known = {"model", "messages", "stream"}
        for body in requests:
            extra = {k: v for k, v in body.items() if k not in known and k not in _SDK_FIELDS}
            params = {k: v for k, v in body.items() if k in _SDK_FIELDS}
            extra = {**(params.pop("extra_body", None) or {}), **extra}
            if extra:
                params["extra_body"] = extra
            try:
                response = self.chat(model=body["model"], messages=body["messages"], **params)
                out.append(response.model_dump(mode="json", exclude_unset=True))
            except GptFinetuneError as exc:
                out.append(exc)
        return out

    def job_spec(self, job_id: str) -> JobSpec | None:
        return None  # OpenAI's jobs are described by the job object itself (retrieve_job)

    def job_label_sets(self, job_id: str) -> LabelSets | None:
        return None  # OpenAI keeps no such record; eval finds them in the training data

    def job_training_data(self, job_id: str) -> Path | None:
        return None  # it lies at OpenAI (``files content`` downloads it)

    def _stream_chunks(self, stream: Any, model: str) -> Iterator[Any]:
        it = iter(stream)
        while True:  # errors in the middle of a stream are reported like any other
            try:
                chunk = self._call(lambda: next(it), f"chat with {model}")
            except StopIteration:
                return
            yield chunk


# what ``chat.completions.create`` takes as keywords (anything else goes in ``extra_body``)
_SDK_FIELDS = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "n",
        "logprobs",
        "top_logprobs",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "response_format",
        "tools",
        "tool_choice",
        "metadata",
        "store",
        "service_tier",
        "extra_body",
    }
)


def _seconds(header: str | None) -> float | None:
    """A Retry-After header's seconds (the HTTP-date form is rare on APIs: treated as absent)."""
    try:
        value = float(header) if header is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 3600 else None


def _no_aliases() -> BackendError:
    # OpenAI's API has no aliases, and this project's server keeps them out of its /v1 surface
    return BackendError(
        "aliases are kept in the store of the machine that serves the models; OpenAI's API has none",
        hint="run it there with --backend local (the server reads the same data directory)",
        code="unsupported",
    )


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return exc.message


def _code(exc: openai.APIStatusError) -> str | None:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return str(err["code"])
    return None
