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
from ..errors import ConfigError, GptFinetuneError
from ..services import Services
from ..settings import Settings
from ..worker.launch import start_runner
from .base import Hyperparameters, Traits


def runner_launcher(settings: Settings) -> Any:
    """``start_runner`` with where the runner's jobs train (``executor``, ``ray_address``,
    ``ray_gpus``) in its environment, since they may come from a config file or flag the runner
    does not read."""
    extra: dict[str, str] = {}
    for key in ("executor", "ray_address", "ray_gpus"):
        value = getattr(settings, key)
        if value is not None:
            extra["GPT_FINETUNE_" + key.upper()] = str(value)

    def launch(home: Any, env: dict[str, str] | None = None) -> None:
        start_runner(home, {**extra, **(env or {})})

    return launch


def open_services(settings: Settings, **kw: Any) -> Services:
    """The services of the configured data directory, with the runner's launcher: what every
    adapter that creates or follows jobs opens. The engine answers in ``inference_dtype``
    wherever it runs (serve, infer, eval, batch files)."""
    if settings.inference_dtype is not None:
        kw["engine_options"] = {"dtype": settings.inference_dtype, **(kw.get("engine_options") or {})}
    return Services.open(
        settings.home,
        local_base_model=settings.local_base_model,
        model_cache=settings.model_cache,
        store_url=settings.store_url,
        launcher=runner_launcher(settings),
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

    def export_model(
        self,
        model_id: str,
        out: Path,
        fmt: str,
        dtype: str | None = None,
        *,
        force: bool = False,
        progress: Any = None,
        evaluation: dict[str, Any] | None = None,
    ) -> Any:
        """Write a model of this data directory as ``fmt`` (``local.export``) at ``out``;
        ``evaluation`` (``eval.report.read_eval_json``) puts this model's figures in its card."""
        from ..local.export import check_request, export

        check_request(fmt, dtype)  # a bad pair is refused before any model is loaded
        source = export_source(self.services, model_id)
        if evaluation is not None:
            source.card["evaluation"] = _evaluation_of(self.services, source.model_id, evaluation)
        return export(source, out, fmt, dtype, force=force, progress=progress or (lambda _m: None))

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


BASE_MODEL_REFS = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the model card's base_model


def export_source(services: Services, model_id: str) -> Any:
    """What ``local.export`` needs to know about a model: its base's directory, its adapter or
    weights, and for its model card what the job that made it did (from the store, read only)."""
    import csv
    import json

    from ..local.base_weights import gguf_path, model_dir, resolve_base
    from ..local.chat_data import TRAINING_SHAPE
    from ..local.export import ExportSource

    models = services.models
    resolved = models.resolve(model_id)
    base_name, weights = models.locate(resolved)
    base = resolve_base(base_name, models.local_base_model)
    adapter = full = None
    if weights is not None:
        adapter, full = (weights, None) if (Path(weights) / "adapter_config.json").is_file() else (None, weights)
    row = services.store.get("models", resolved)
    card: dict[str, Any] = {"base_model_ref": BASE_MODEL_REFS.get(base.id, base.id)}
    system_prompt = max_length = None
    if row is not None and row.get("job_id"):
        job_row = services.jobs.row(row["job_id"])
        spec = JobSpec.from_row(job_row)
        job = services.jobs.retrieve(row["job_id"])
        card |= {
            "job_id": row["job_id"],
            "method": spec.method,
            "trained_tokens": job.get("trained_tokens"),
            "hyperparameters": {k: v for k, v in spec.hyperparameters.to_json().items() if v not in (None, "auto")},
            "lora": (
                {
                    "r": spec.local.lora.r,
                    "alpha": spec.local.lora.alpha,
                    "targets": list(spec.local.lora.target_modules),
                }
                if spec.local.model.training_type == "lora"
                else None
            ),
            "labels": sorted(spec.labels.labels) if spec.labels else None,
        }
        max_length = spec.local.model.max_length
        data = services.files.path(job_row["training_file"])
        if data is not None and data.is_file():
            card["training_file"] = f"{job_row['training_file']} ({data.name})"
            card["n_examples"], system_prompt = _examples_and_system(data)
        for file_id in job.get("result_files") or []:
            path = services.files.path(file_id)
            if path is not None and path.is_file():
                with open(path, newline="", encoding="utf-8") as fh:
                    last = list(csv.DictReader(fh))[-1:]
                card["results"] = {f"final {k}": float(v) for r in last for k, v in r.items() if v and k != "step"}
    shape = Path(adapter or full or "") / TRAINING_SHAPE
    if shape.is_file():
        max_length = json.loads(shape.read_text()).get("max_length") or max_length
    tokenizer_gguf = gguf_path()
    return ExportSource(
        model_id=resolved,
        base_id=base.id,
        base_dir=model_dir(base, services.home),
        adapter_dir=adapter,
        full_dir=full,
        tokenizer_gguf=str(tokenizer_gguf) if tokenizer_gguf else None,
        system_prompt=system_prompt,
        max_length=max_length,
        card=card,
    )


def _evaluation_of(services: Services, model_id: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """This model's entry of an eval file: the one whose name (an id, alias or job id, as given
    to ``eval``) resolves to it. One clear error, naming the file, when none does."""
    for name, figures in evaluation["results"].items():
        try:
            same = services.models.resolve(name) == model_id
        except GptFinetuneError:  # a baseline's name, or a model of another data directory
            same = False
        if same:
            return {"data": evaluation.get("data"), "task": evaluation.get("task"), "name": name, **figures}
    raise ConfigError(
        f"{evaluation['path']}: no results for {model_id} (it has {', '.join(evaluation['results']) or 'none'})",
        hint="evaluate this model: gpt-finetune eval --data FILE --models MODEL --json > results.json",
    )


def _examples_and_system(path: Path) -> tuple[int, str | None]:
    """(how many examples, the system prompt most of them start with) of a training file
    (chat or preference lines), for the model card and Ollama's SYSTEM."""
    import json
    from collections import Counter

    systems: Counter[str] = Counter()
    n = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            n += 1
            try:
                row = json.loads(line)
                messages = row.get("messages") or (row.get("input") or {}).get("messages") or []
            except (ValueError, AttributeError):
                continue
            if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
                systems[str(messages[0].get("content") or "")] += 1
    common = systems.most_common(1)
    return n, (common[0][0] if common and common[0][1] * 2 > n else None)
