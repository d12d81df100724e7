"""Services own the job lifecycle and every write to the store. The CLI's local backend, the
server and the training worker all call them; the engine (``local/``) never does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..home import Home
from ..settings import from_env
from ..store import Store, open_store
from .chat import ChatService
from .files import FileService
from .jobs import JobService, Launcher
from .models import ModelService
from .workers import WorkerService


@dataclass
class Services:
    home: Home
    store: Store
    files: FileService
    jobs: JobService
    models: ModelService
    chat: ChatService
    workers: WorkerService

    @classmethod
    def open(
        cls,
        root: str | Path | None = None,
        *,
        local_base_model: str | None = None,
        max_queue: int | None = None,
        engine_options: dict[str, Any] | None = None,
        name_paths: bool = True,
        model_cache: str | Path | None = None,
        launcher: Launcher | None = None,
        store_url: str | None = None,
    ) -> Services:
        """``name_paths=False`` for a server: its clients name models, never directories.
        ``launcher`` starts the training runner when jobs wait (the adapters give
        ``worker.launch.start_runner``; without one, nothing is started). ``engine_options``: the
        engine's scheduling and weights (``max_batch``, ``kv_cache_gb``, ``max_adapters``,
        ``dtype``; see ``Engine``).
        ``store_url``: a PostgreSQL database instead of the data directory's SQLite file (default:
        ``GPT_FINETUNE_STORE_URL``, which the runner and its workers inherit)."""
        home = Home(root, model_cache=model_cache)
        store = open_store(store_url or from_env("store_url"), home.db)
        files = FileService(store, home)
        models = ModelService(store, home, local_base_model=local_base_model, name_paths=name_paths)
        workers = WorkerService(store)
        jobs = JobService(store, home, files, models, launcher=launcher, workers=workers)

        def engine() -> Any:  # loaded at the first chat request: torch is not needed before
            from ..local.inference import DEFAULT_QUEUE, Engine

            return Engine(home, models.local_base_model, max_queue=max_queue or DEFAULT_QUEUE, **(engine_options or {}))

        return cls(home, store, files, jobs, models, ChatService(models, engine), workers)


__all__ = ["ChatService", "FileService", "JobService", "ModelService", "Services", "WorkerService"]
