"""The interface both backends implement. Verbs are the openai SDK's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the openai SDK takes ~0.7 s to import; data commands never need it
    from openai.types import FileObject, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent


@dataclass
class Hyperparameters:
    """OpenAI's three knobs; ``"auto"`` (or None) lets the backend choose."""

    n_epochs: int | str | None = None
    batch_size: int | str | None = None
    learning_rate_multiplier: float | str | None = None

    def explicit(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != "auto"}


class Backend(Protocol):
    name: str

    def describe(self) -> str: ...

    # files
    def upload_file(self, path: Path, purpose: str = "fine-tune") -> FileObject: ...
    def list_files(self) -> list[FileObject]: ...
    def retrieve_file(self, file_id: str) -> FileObject: ...
    def delete_file(self, file_id: str) -> bool: ...

    # fine-tuning jobs
    def check_job(self, *, model: str, suffix: str | None = None, seed: int | None = None) -> None:
        """Refuse what can be refused before anything is uploaded."""
        ...

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
    ) -> FineTuningJob: ...
    def retrieve_job(self, job_id: str) -> FineTuningJob: ...
    def list_jobs(
        self, *, limit: int = 20, after: str | None = None, metadata: dict[str, str] | None = None
    ) -> list[FineTuningJob]: ...
    def cancel_job(self, job_id: str) -> FineTuningJob: ...
    def pause_job(self, job_id: str) -> FineTuningJob: ...
    def resume_job(self, job_id: str) -> FineTuningJob: ...
    def list_events(self, job_id: str, *, limit: int = 100, after: str | None = None) -> list[FineTuningJobEvent]: ...
    def list_checkpoints(self, job_id: str) -> list[Any]: ...

    # models
    def list_models(self) -> list[Model]: ...
    def retrieve_model(self, model_id: str) -> Model: ...
    def delete_model(self, model_id: str) -> bool: ...
    def add_alias(self, alias: str, model_id: str, *, replace: bool = False) -> Model:
        """Let ``alias`` name ``model_id`` (kept by the serving machine's store)."""
        ...

    def remove_alias(self, alias: str) -> bool: ...

    # inference
    def chat(
        self, *, model: str, messages: list[dict[str, Any]], stream: bool = False, **params: Any
    ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """``chat.completions.create``: ``params`` are its other fields (max_tokens, temperature,
        stop, seed, n, logprobs, ...). A ``ChatCompletion``, or its chunks when ``stream``."""
        ...


def chat_text(response: Any, *, stream: bool) -> Iterator[str]:
    """The first choice's text from what ``Backend.chat`` returned: whole, or as it streams."""
    if not stream:
        yield response.choices[0].message.content or ""
        return
    for chunk in response:
        for choice in chunk.choices:
            if choice.index == 0 and choice.delta and choice.delta.content:
                yield choice.delta.content
