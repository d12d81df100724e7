"""Files: what ``files.create`` uploads, kept under the data directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from ..atomic import atomic_outputs
from ..errors import BackendError, NotFoundError
from ..home import Home, safe_name
from ..store import Store, new_id, now

PURPOSES = ("fine-tune", "fine-tune-results", "batch", "assistants", "user_data", "evals")


class FileService:
    def __init__(self, store: Store, home: Home) -> None:
        self.store = store
        self.home = home

    def create(self, fileobj: BinaryIO, filename: str, purpose: str = "fine-tune") -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise BackendError(f"purpose must be one of {', '.join(PURPOSES)}", code="invalid_purpose")
        file_id = new_id("file")
        path = self.home.files / f"{file_id}{Path(filename).suffix[:10] or '.dat'}"
        with atomic_outputs() as group, group.open(path, "wb") as out:
            shutil.copyfileobj(fileobj, out)  # type: ignore[misc]
        return self.register(path, os.path.basename(filename) or "upload", purpose, file_id=file_id)

    def create_from_path(self, path: str | Path, purpose: str = "fine-tune") -> dict[str, Any]:
        from ..data.readers import open_input

        with open_input(path) as fh:
            return self.create(fh, Path(path).name, purpose)

    def register(self, path: Path, filename: str, purpose: str, *, file_id: str | None = None) -> dict[str, Any]:
        """Record a file written under the data directory (an upload, or a job's result CSV)."""
        row = {
            "id": file_id or new_id("file"),
            "filename": filename,
            "purpose": purpose,
            "bytes": path.stat().st_size,
            "created_at": now(),
            "path": str(path),
        }
        self.store.insert("files", row)
        return row

    def retrieve(self, file_id: str) -> dict[str, Any]:
        row = self.store.get("files", safe_name(file_id, "file"))
        if row is None:
            raise NotFoundError(f"No such File object: {file_id}", code="file_not_found")
        return row

    def path(self, file_id: str) -> Path:
        return Path(self.retrieve(file_id)["path"])

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        if purpose:
            return self.store.query("SELECT * FROM files WHERE purpose = ? ORDER BY created_at DESC, id", (purpose,))
        return self.store.query("SELECT * FROM files ORDER BY created_at DESC, id")

    def delete(self, file_id: str) -> bool:
        row = self.retrieve(file_id)
        self.store.delete("files", row["id"])
        try:
            os.unlink(row["path"])
        except FileNotFoundError:
            pass
        return True

    @staticmethod
    def to_openai(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": row["id"],
            "object": "file",
            "bytes": row["bytes"],
            "created_at": row["created_at"],
            "filename": row["filename"],
            "purpose": row["purpose"],
            "status": "processed",
        }
