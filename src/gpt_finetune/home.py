"""The data directory: one place for the database, uploaded files, jobs and models.

$GPT_FINETUNE_HOME/            (default ~/.gpt-finetune)
  gpt-finetune.db              SQLite: files, jobs, events, checkpoints, models
  files/<file id>.jsonl        uploaded files
  jobs/<job id>/               checkpoints/, result.csv, train.log
  models/<job id>/             fine-tuned adapters (or full weights)
  models/base/<name>/          base models converted once (GGUF -> safetensors)
  runner.lock, logs/runner.log the training worker's lock and log
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import NotFoundError, StoreError
from .settings import default_home, from_env

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def safe_name(identifier: str, what: str = "id") -> str:
    """An id that is about to become part of a path: letters, digits, ``_ . -`` only."""
    if not _SAFE.match(identifier) or ".." in identifier:
        raise NotFoundError(f"no such {what}: {identifier!r}")
    return identifier


class Home:
    def __init__(self, root: str | Path | None = None, model_cache: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_home()
        # converted base models: shared between data directories when set (``model_cache``)
        cache = model_cache or from_env("model_cache")
        self.model_cache = Path(cache).expanduser() if cache else None
        hint = "set GPT_FINETUNE_HOME (or --home) to a directory you can write"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"the data directory {self.root} is not a directory", hint=hint) from None
        except OSError as exc:
            raise StoreError(f"cannot create the data directory {self.root}: {exc.strerror}", hint=hint) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"the data directory {self.root} cannot be written", hint=hint)

    @property
    def db(self) -> Path:
        return self.root / "gpt-finetune.db"

    @property
    def files(self) -> Path:
        return self._dir("files")

    def job_dir(self, job_id: str) -> Path:
        return self._dir("jobs") / safe_name(job_id, "job")

    def model_dir(self, job_id: str) -> Path:
        return self._dir("models") / safe_name(job_id, "model")

    @property
    def base_models(self) -> Path:
        path = self.model_cache or self.root / "models" / "base"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def logs(self) -> Path:
        return self._dir("logs")

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path
