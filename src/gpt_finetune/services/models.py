"""Models: base models, fine-tuned models and their checkpoints, with OpenAI's ids, and aliases.

Fine-tuned ``ft:<base>:<suffix>:<job id>``; checkpoints ``ft:<base>:<suffix>:<job id>:ckpt-step-<N>``.

An alias is another name a model answers to: the OpenAI id of a fine-tune that was moved here
(``ft:gpt-4o-mini-2024-07-18:acme::AbC123``, ``gpt-finetune migrate``), or one the user adds. A
name is looked up in this order: a real model (the store's models, then the base models), then an
alias, and only then parsed (an OpenAI base name, a directory). So an alias never shadows a real
model id, and OpenAI ids, which have as many ``:`` parts as our checkpoint ids, are never parsed
as ours.
"""

from __future__ import annotations

import builtins
import re
import shutil
from pathlib import Path
from typing import Any

from ..base_catalog import DEFAULT_BASE_MODEL, gguf_path, is_openai_name, resolve_base
from ..contract import JobSpec, JobStatus, sql_in
from ..errors import BackendError, NotFoundError
from ..home import Home
from ..store import Store, now

# what an alias may be: a model id as OpenAI writes one (letters, digits and ``. _ : - / @ +``)
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")


def fine_tuned_id(base_id: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base_id}:{suffix or ''}:{job_id}"


def not_found(model_id: str) -> NotFoundError:
    """The one answer for a name that is not a model here, whether or not it names a path."""
    shown = model_id if len(model_id) <= 100 else model_id[:100] + "..."
    return NotFoundError(
        f"The model '{shown}' does not exist",
        code="model_not_found",
        param="model",
        hint="see: gpt-finetune models list",
    )


class ModelService:
    """``name_paths``: whether a model may be named by a directory or a Hub id. The CLI's user is
    the machine's operator and may; a server's clients may not: to them model ids are names (the
    catalog's and the configured base models, fine-tuned models, checkpoints and aliases), so a
    client can neither load a directory of the server's disk nor learn which ones exist, nor make
    the server download from a hub."""

    def __init__(
        self, store: Store, home: Home, *, local_base_model: str | None = None, name_paths: bool = True
    ) -> None:
        self.store = store
        self.home = home
        self.local_base_model = local_base_model or DEFAULT_BASE_MODEL
        self.name_paths = name_paths

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
        and every base a job has trained (a job that failed leaves no model behind)."""
        ids = [DEFAULT_BASE_MODEL] if gguf_path() is not None else []
        if self.local_base_model != DEFAULT_BASE_MODEL:
            try:
                ids.append(resolve_base(self.local_base_model).id)
            except NotFoundError:
                pass  # a job naming it fails with the reason; listing does not
        for row in self.store.query(f"SELECT DISTINCT base_model FROM jobs WHERE {sql_in([JobStatus.SUCCEEDED])}"):
            if row["base_model"] not in ids:
                ids.append(row["base_model"])
        return ids

    def list(self) -> list[dict[str, Any]]:
        """Base models, then fine-tuned models and their checkpoints (newest first), as OpenAI
        lists them; each names its base as vLLM does (``parent``, ``root``); then the aliases,
        each with the model it names as its ``parent``."""
        out = [self._base(b) for b in self.base_ids()]
        for row in self.store.query("SELECT * FROM models ORDER BY created DESC, kind DESC, id"):
            out.append(self.to_openai(row))
        for row in self.store.query("SELECT * FROM aliases ORDER BY created DESC, id"):
            out.append(self._alias(row))
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
        alias = self.store.get("aliases", model_id)
        if alias is not None:
            return self._alias(alias)
        raise not_found(model_id)

    # ---- aliases ------------------------------------------------------------------------
    def resolve(self, model_id: str) -> str:
        """The model a name stands for: itself when it is a real model (or nothing we know),
        else the model its alias names."""
        if self.store.get("models", model_id) is not None:
            return model_id
        alias = self.store.get("aliases", model_id)
        if alias is None or model_id in self.base_ids():
            return model_id
        return str(alias["model"])

    def add_alias(self, alias: str, model_id: str, *, note: str | None = None, replace: bool = False) -> dict[str, Any]:
        """Let ``alias`` name ``model_id`` (a fine-tuned model, a checkpoint or a base model; an
        alias of an alias names the model itself). Adding the same alias again is a no-op."""
        if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
            raise BackendError(
                f"{alias[:80]!r} cannot be an alias: use up to 256 letters, digits and . _ : - / @ + "
                "(starting with a letter or digit)",
                code="invalid_alias",
                param="alias",
            )
        if self.store.get("models", alias) is not None or alias in self.base_ids() or self._is_base_name(alias):
            raise BackendError(
                f"{alias} is the id of a model here; an alias never shadows a model",
                code="alias_shadows_model",
                param="alias",
            )
        target = self.resolve(model_id)
        if target == alias:
            raise BackendError(f"{alias} cannot be an alias of itself", code="invalid_alias", param="alias")
        self.retrieve(target)  # the model must exist (NotFoundError otherwise)
        existing = self.store.get("aliases", alias)
        if existing is not None:
            if existing["model"] == target:
                return self._alias(existing)
            if not replace:
                raise BackendError(
                    f"{alias} is already an alias of {existing['model']}",
                    code="alias_exists",
                    status=409,
                    hint=f"remove it first (gpt-finetune models unalias {alias}), or replace it (--force)",
                )
            self.store.delete("aliases", alias)
        self.store.insert("aliases", {"id": alias, "model": target, "created": now(), "note": note})
        return self._alias(self.store.get("aliases", alias) or {})

    def remove_alias(self, alias: str) -> bool:
        if not self.store.delete("aliases", alias):
            raise NotFoundError(f"{alias} is not an alias", code="alias_not_found")
        return True

    def aliases(self, model_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """Alias rows (id, model, created, note), of one model or all."""
        if model_id is None:
            return self.store.query("SELECT * FROM aliases ORDER BY created, id")
        return self.store.query("SELECT * FROM aliases WHERE model = ? ORDER BY created, id", (model_id,))

    def _alias(self, row: dict[str, Any]) -> dict[str, Any]:
        target = str(row["model"])
        target_row = self.store.get("models", target)
        root = self.to_openai(target_row)["root"] if target_row is not None else target
        return {
            "id": row["id"],
            "object": "model",
            "created": row["created"],
            "owned_by": "user",
            "parent": target,
            "root": root,
        }

    def _is_base_name(self, name: str) -> bool:
        """A name that resolves to a base model without a lookup (an OpenAI base name, the default)."""
        return is_openai_name(name) or name == DEFAULT_BASE_MODEL

    def locate(self, model_id: str) -> tuple[str, str | None]:
        """(base model name for resolve_base, adapter or weights directory or None) for inference."""
        model_id = self.resolve(model_id)
        row = self.store.get("models", model_id)
        if row is not None:
            if not Path(row["path"]).exists():
                raise NotFoundError(
                    f"the files of model {model_id} are gone from the data directory", code="model_not_found"
                )
            return row["base"], row["path"]
        if is_openai_name(model_id) or model_id == self.local_base_model:
            return self.local_base_model, None
        location = self._base_location(model_id)
        if location is not None:
            return location, None
        if model_id == DEFAULT_BASE_MODEL and gguf_path() is not None:
            return model_id, None
        if not self.name_paths:
            raise not_found(model_id)
        try:
            resolve_base(model_id, self.local_base_model)
        except NotFoundError:
            raise not_found(model_id) from None
        return model_id, None

    def starting_point(self, model: str) -> tuple[Any, str | None]:
        """What a job asking for ``model`` starts from: (its base model, the adapter it continues
        or None). A fine-tuned model (or checkpoint) of this project is its base and its adapter,
        so a job on ``ft:...`` continues that model (OpenAI's SFT-then-DPO path); a fully
        trained one is its own weights' directory; anything else is a base model."""
        row = self.store.get("models", self.resolve(model))
        if row is None:
            return self.trainable(model), None
        path = Path(row["path"])
        if not path.exists():
            raise NotFoundError(
                f"the files of model {row['id']} are gone from the data directory", code="model_not_found"
            )
        if (path / "adapter_config.json").is_file():
            return resolve_base(row["base"], self.local_base_model), str(path)
        return resolve_base(str(path), self.local_base_model), None

    def trainable(self, model: str) -> Any:
        """The base model a job asking for ``model`` trains (a ``catalog.BaseModel``)."""
        if self.name_paths or is_openai_name(model) or model in (DEFAULT_BASE_MODEL, self.local_base_model):
            return resolve_base(model, self.local_base_model)
        location = self._base_location(model)
        if location is None:
            raise not_found(model)
        return resolve_base(location, self.local_base_model)

    def _base_location(self, model_id: str) -> str | None:
        """Where a base model listed by its short name (a directory's name) lives."""
        if self.local_base_model != DEFAULT_BASE_MODEL:
            try:
                if resolve_base(self.local_base_model).id == model_id:
                    return self.local_base_model
            except NotFoundError:
                pass
        query = f"SELECT * FROM jobs WHERE base_model = ? AND {sql_in([JobStatus.SUCCEEDED])} LIMIT 1"
        for row in self.store.query(query, (model_id,)):
            return JobSpec.from_row(row).base or model_id
        return None

    def delete(self, model_id: str) -> bool:
        """Delete a fine-tuned model (and its checkpoints), freeing their disk. Base models
        cannot be deleted (as on OpenAI)."""
        row = self.store.get("models", model_id)
        if row is None and model_id not in self.base_ids() and self.store.get("aliases", model_id) is not None:
            return self.remove_alias(model_id)  # the alias only: the model it names stays
        if row is None:
            if model_id in self.base_ids() or is_openai_name(model_id):
                # as OpenAI does: only your own fine-tuned models can be deleted
                raise BackendError(
                    f"{model_id} is a base model; only fine-tuned models can be deleted",
                    code="model_not_deletable",
                    hint="to free the default model's converted copy, remove "
                    f"{self.home.base_models / DEFAULT_BASE_MODEL} (it is converted again on next use)",
                )
            raise not_found(model_id)
        if row["kind"] != "fine-tuned":
            raise BackendError("only fine-tuned models can be deleted; checkpoints go with their model")
        job_id = row["job_id"]
        for ckpt in self.store.query("SELECT * FROM models WHERE job_id = ? AND kind = 'checkpoint'", (job_id,)):
            shutil.rmtree(ckpt["path"], ignore_errors=True)
            self.forget(ckpt["id"])
        shutil.rmtree(row["path"], ignore_errors=True)
        shutil.rmtree(self.home.job_dir(job_id) / "checkpoints", ignore_errors=True)
        self.store.execute("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))
        self.forget(model_id)
        return True

    def forget(self, model_id: str) -> None:
        """Remove a model's row and every alias of it (its files are the caller's)."""
        self.store.delete("models", model_id)
        self.store.execute("DELETE FROM aliases WHERE model = ?", (model_id,))

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
