"""Services own the job lifecycle. The CLI's local backend and the server both call them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..home import Home
from ..store import Store
from .files import FileService
from .jobs import JobService
from .models import ModelService


@dataclass
class Services:
    home: Home
    store: Store
    files: FileService
    jobs: JobService
    models: ModelService

    @classmethod
    def open(cls, root: str | Path | None = None, *, local_base_model: str | None = None) -> Services:
        home = Home(root)
        store = Store(home.db)
        files = FileService(store, home)
        models = ModelService(store, home, local_base_model=local_base_model)
        jobs = JobService(store, home, files, models)
        return cls(home, store, files, jobs, models)


__all__ = ["FileService", "JobService", "ModelService", "Services"]
