"""Models: base models, fine-tuned models and their checkpoints, with OpenAI's ids.

Fine-tuned ``ft:<base>:<suffix>:<job id>``; checkpoints ``ft:<base>:<suffix>:<job id>:ckpt-step-<N>``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..catalog import DEFAULT_BASE_MODEL, gguf_path, is_openai_name, resolve_base
from ..errors import BackendError, NotFoundError
from ..home import Home
from ..store import Store, now


def fine_tuned_id(base_id: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base_id}:{suffix or ''}:{job_id}"


class ModelService:
    def __init__(self, store: Store, home: Home, *, local_base_model: str | None = None) -> None:
        self.store = store
        self.home = home
        self.local_base_model = local_base_model or DEFAULT_BASE_MODEL

    def register(self, model_id: str, *, kind: str, base: str, path: Path, job_id: str) -> None:
        self.store.execute("DELETE FROM models WHERE id = ?", (model_id,))
        self.store.insert(
            "models",
            {
                "id": model_id,
                "created": now(),
                "owned_by": "user",
                "kind": kind,
                "base": base,
                "path": str(path),
                "job_id": job_id,
            },
        )

    def base_ids(self) -> list[str]:
        """The default model (when installed), the configured local base model (a directory),
        and every base a job has trained."""
        ids = [DEFAULT_BASE_MODEL] if gguf_path() is not None else []
        if self.local_base_model != DEFAULT_BASE_MODEL:
            try:
                ids.append(resolve_base(self.local_base_model).id)
            except NotFoundError:
                pass  # a job naming it fails with the reason; listing does not
        for row in self.store.query("SELECT DISTINCT base_model FROM jobs"):
            if row["base_model"] not in ids:
                ids.append(row["base_model"])
        return ids

    def list(self) -> list[dict[str, Any]]:
        """Base models, then fine-tuned models and their checkpoints (newest first), as OpenAI
        lists them; each names its base as vLLM does (``parent``, ``root``)."""
        out = [self._base(b) for b in self.base_ids()]
        for row in self.store.query("SELECT * FROM models ORDER BY created DESC, kind DESC, id"):
            out.append(self.to_openai(row))
        return out

    @staticmethod
    def _base(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "system", "parent": None, "root": model_id}

    def retrieve(self, model_id: str) -> dict[str, Any]:
        row = self.store.get("models", model_id)
        if row is not None:
            return self.to_openai(row)
        if model_id in self.base_ids():
            return self._base(model_id)
        raise NotFoundError(f"The model '{model_id}' does not exist", code="model_not_found")

    def locate(self, model_id: str) -> tuple[str, str | None]:
        """(base model name for resolve_base, adapter or weights directory or None) for inference."""
        row = self.store.get("models", model_id)
        if row is not None:
            if not Path(row["path"]).exists():
                raise NotFoundError(f"the files of model {model_id} are gone ({row['path']})")
            return row["base"], row["path"]
        if is_openai_name(model_id):
            return self.local_base_model, None
        location = self._base_location(model_id)
        if location is not None:
            return location, None
        try:
            resolve_base(model_id, self.local_base_model)
        except NotFoundError:
            raise NotFoundError(
                f"The model '{model_id}' does not exist", code="model_not_found", hint="see: gpt-finetune models list"
            ) from None
        return model_id, None

    def _base_location(self, model_id: str) -> str | None:
        """Where a base model listed by its short name (a directory's name) lives."""
        if self.local_base_model != DEFAULT_BASE_MODEL:
            try:
                if resolve_base(self.local_base_model).id == model_id:
                    return self.local_base_model
            except NotFoundError:
                pass
        for row in self.store.query("SELECT options FROM jobs WHERE base_model = ? LIMIT 1", (model_id,)):
            return str(row["options"].get("base") or model_id)
        return None

    def delete(self, model_id: str) -> bool:
        """Delete a fine-tuned model (and its checkpoints), freeing their disk. Base models
        cannot be deleted (as on OpenAI)."""
        row = self.store.get("models", model_id)
        if row is None:
            if model_id in self.base_ids() or is_openai_name(model_id):
                # as OpenAI does: only your own fine-tuned models can be deleted
                raise BackendError(
                    f"{model_id} is a base model; only fine-tuned models can be deleted",
                    code="model_not_deletable",
                    hint="to free the default model's converted copy, remove "
                    f"{self.home.base_models / DEFAULT_BASE_MODEL} (it is converted again on next use)",
                )
            raise NotFoundError(f"The model '{model_id}' does not exist", code="model_not_found")
        if row["kind"] != "fine-tuned":
            raise BackendError("only fine-tuned models can be deleted; checkpoints go with their model")
        job_id = row["job_id"]
        for ckpt in self.store.query("SELECT * FROM models WHERE job_id = ? AND kind = 'checkpoint'", (job_id,)):
            shutil.rmtree(ckpt["path"], ignore_errors=True)
            self.store.delete("models", ckpt["id"])
        shutil.rmtree(row["path"], ignore_errors=True)
        shutil.rmtree(self.home.job_dir(job_id) / "checkpoints", ignore_errors=True)
        self.store.execute("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))
        self.store.delete("models", model_id)
        return True

    @staticmethod
    def to_openai(row: dict[str, Any]) -> dict[str, Any]:
        """A fine-tuned model's parent and root are its base model; a checkpoint's parent is its
        fine-tuned model (``ft:<base>:<suffix>:<job>[:ckpt-step-N]``)."""
        parts = row["id"].split(":")
        base = parts[1] if len(parts) >= 4 and parts[0] == "ft" else row["base"]
        parent = ":".join(parts[:4]) if row["kind"] == "checkpoint" else base
        return {
            "id": row["id"],
            "object": "model",
            "created": row["created"],
            "owned_by": row["owned_by"],
            "parent": parent,
            "root": base,
        }
