"""The interface both backends implement. Verbs are the openai SDK's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..contract import JobSpec, LabelSets, SupervisedHyperparameters
from ..errors import GptFinetuneError

if TYPE_CHECKING:  # the openai SDK takes ~0.7 s to import; data commands never need it
    from openai.types import FileObject, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent


# OpenAI's three knobs (``auto`` or None lets the backend choose), declared in the contract
Hyperparameters = SupervisedHyperparameters


@dataclass(frozen=True)
class Traits:
    """What a backend does best, so that commands choose without asking which backend it is."""

    batched_chat: bool  # answers several greedy requests at once (chat_many) faster than one by one
    guided_choice: bool  # label-constrained answers (the guided_choice extension) are expected to work
    concurrency: int  # requests at once a batch file is sent with by default


class Backend(Protocol):
    name: str  # for messages only: no command branches on it (``traits`` says what differs)
    traits: Traits

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
        method: str = "supervised",
    ) -> FineTuningJob:
        """Create a job of OpenAI's ``method`` (``supervised`` or ``dpo``) with that method's
        ``hyperparameters`` (``contract.HYPERPARAMETERS``)."""
        ...

    def retrieve_job(self, job_id: str) -> FineTuningJob: ...
    def list_jobs(
        self, *, limit: int = 20, after: str | None = None, metadata: dict[str, str] | None = None
    ) -> list[FineTuningJob]: ...
    def cancel_job(self, job_id: str) -> FineTuningJob: ...
    def pause_job(self, job_id: str) -> FineTuningJob: ...
    def resume_job(self, job_id: str) -> FineTuningJob: ...
    def list_events(self, job_id: str, *, limit: int = 100, after: str | None = None) -> list[FineTuningJobEvent]: ...
    def list_checkpoints(self, job_id: str) -> list[Any]: ...
    def job_spec(self, job_id: str) -> JobSpec | None:
        """The job's resolved description, where this backend trains it (None: OpenAI's)."""
        ...

    def job_label_sets(self, job_id: str) -> LabelSets | None:
        """The label sets a classification job was trained on (None: not one, or not known)."""
        ...

    def job_training_data(self, job_id: str) -> Path | None:
        """The job's training file on this machine (None: not here)."""
        ...

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

    def chat_many(
        self, requests: list[dict[str, Any]], *, batch_size: int = 8
    ) -> list[dict[str, Any] | GptFinetuneError]:
        """Several non-streaming requests (request bodies, extension fields inline): each answer as
        a JSON ``ChatCompletion``, or the error that refused it, in order."""
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
