"""The ``local`` backend: this project's services in-process, in the openai SDK's types.

Jobs train in a detached worker (see ``services.jobs``); creating this backend is enough to
recover and resume jobs whose worker died.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openai.types import FileObject, Model
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from ..contract import JobSpec, LabelSets, LocalOptions
from ..errors import GptFinetuneError
from ..services import Services
from ..settings import Settings
from ..worker.launch import start_runner
from .base import Hyperparameters, Traits


def open_services(settings: Settings, **kw: Any) -> Services:
    """The services of the configured data directory, with the runner's launcher: what every
    adapter that creates or follows jobs opens."""
    return Services.open(
        settings.home,
        local_base_model=settings.local_base_model,
        model_cache=settings.model_cache,
        launcher=start_runner,
        **kw,
    )


class LocalBackend:
    name = "local"
    # the engine batches requests itself (continuous batching): chat_many hands it several at once
    traits = Traits(batched_chat=True, guided_choice=True, concurrency=1)

    def __init__(self, services: Services, options: LocalOptions | dict[str, Any] | None = None) -> None:
        self.services = services
        if services.jobs.launcher is None:
            services.jobs.launcher = start_runner
        self.options = options if isinstance(options, LocalOptions) else LocalOptions.from_settings(options or {})
        services.jobs.kick()  # resume what a dead worker left

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalBackend:
        return cls(open_services(settings), settings.local_options())

    def describe(self) -> str:
        return f"local backend (data in {self.services.home.root})"

    # files
    def upload_file(self, path: Path, purpose: str = "fine-tune") -> FileObject:
        return FileObject(**self.services.files.to_openai(self.services.files.create_from_path(path, purpose)))

    def list_files(self) -> list[FileObject]:
        return [FileObject(**self.services.files.to_openai(r)) for r in self.services.files.list()]

    def retrieve_file(self, file_id: str) -> FileObject:
        return FileObject(**self.services.files.to_openai(self.services.files.retrieve(file_id)))

    def delete_file(self, file_id: str) -> bool:
        return self.services.files.delete(file_id)

    # jobs
    def check_job(self, *, model: str, suffix: str | None = None, seed: int | None = None) -> None:
        self.services.jobs.check_request(model=model, suffix=suffix, seed=seed)

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
        job = self.services.jobs.create(
            model=model,
            training_file=training_file,
            validation_file=validation_file,
            hyperparameters=hyperparameters,
            suffix=suffix,
            seed=seed,
            metadata=metadata,
            options=self.options,
            method=method,
        )
        return FineTuningJob(**job)

    def retrieve_job(self, job_id: str) -> FineTuningJob:
        return FineTuningJob(**self.services.jobs.retrieve(job_id))

    def list_jobs(
        self, *, limit: int = 20, after: str | None = None, metadata: dict[str, str] | None = None
    ) -> list[FineTuningJob]:
        jobs = self.services.jobs.list_jobs(limit=limit, after=after, metadata=metadata)[0]
        return [FineTuningJob(**j) for j in jobs]

    def cancel_job(self, job_id: str) -> FineTuningJob:
        return FineTuningJob(**self.services.jobs.cancel(job_id))

    def pause_job(self, job_id: str) -> FineTuningJob:
        # the SDK's typed status has no "paused" (the spec's pause example returns it)
        return FineTuningJob.model_construct(**self.services.jobs.pause(job_id))

    def resume_job(self, job_id: str) -> FineTuningJob:
        return FineTuningJob(**self.services.jobs.resume(job_id))

    def list_events(self, job_id: str, *, limit: int = 100, after: str | None = None) -> list[FineTuningJobEvent]:
        return [FineTuningJobEvent(**e) for e in self.services.jobs.list_events(job_id, limit=limit, after=after)[0]]

    def list_checkpoints(self, job_id: str) -> list[Any]:
        return [FineTuningJobCheckpoint(**c) for c in self.services.jobs.list_checkpoints(job_id, limit=100)[0]]

    def job_spec(self, job_id: str) -> JobSpec | None:
        return self.services.jobs.spec(job_id)

    def job_label_sets(self, job_id: str) -> LabelSets | None:
        return self.services.jobs.spec(job_id).labels

    def job_training_data(self, job_id: str) -> Path | None:
        return self.services.files.path(self.services.jobs.row(job_id)["training_file"])

    # models
    def list_models(self) -> list[Model]:
        return [Model(**m) for m in self.services.models.list()]

    def retrieve_model(self, model_id: str) -> Model:
        return Model(**self.services.models.retrieve(model_id))

    def delete_model(self, model_id: str) -> bool:
        return self.services.models.delete(model_id)

    def add_alias(self, alias: str, model_id: str, *, replace: bool = False) -> Model:
        return Model(**self.services.models.add_alias(alias, model_id, replace=replace))

    def remove_alias(self, alias: str) -> bool:
        return self.services.models.remove_alias(alias)

    # inference
    def chat(self, *, model: str, messages: list[dict[str, Any]], stream: bool = False, **params: Any) -> Any:
        from openai.types.chat import ChatCompletion, ChatCompletionChunk

        extra = params.pop("extra_body", None) or {}  # extension fields, as the openai SDK sends them
        request = {"model": model, "messages": messages, **{k: v for k, v in params.items() if v is not None}, **extra}
        if stream:
            request["stream"] = True
            return (ChatCompletionChunk(**c) for c in self.services.chat.start(request).chunks())
        return ChatCompletion(**self.services.chat.start(request).completion())

    def chat_many(
        self, requests: list[dict[str, Any]], *, batch_size: int = 8
    ) -> list[dict[str, Any] | GptFinetuneError]:
        return self.services.chat.create_many(requests, batch_size=batch_size)
