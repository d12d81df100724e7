"""Files: what ``files.create`` uploads, kept under the data directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

from ..atomic import atomic_outputs
from ..errors import BackendError, DataError, NotFoundError
from ..home import Home, safe_name
from ..store import Store, new_id, now

PURPOSES = ("fine-tune", "fine-tune-results", "batch", "assistants", "user_data", "evals")


class FileService:
    def __init__(self, store: Store, home: Home) -> None:
        self.store = store
        self.home = home

    def create(
        self, fileobj: BinaryIO, filename: str, purpose: str = "fine-tune", *, max_bytes: int | None = None
    ) -> dict[str, Any]:
        """Keep an upload. Past ``max_bytes`` it is refused (413) and nothing is kept."""
        if purpose not in PURPOSES:
            raise BackendError(f"purpose must be one of {', '.join(PURPOSES)}", code="invalid_purpose", param="purpose")
        file_id = new_id("file")
        suffix = "".join(c for c in Path(filename).suffix[:10] if c.isalnum() or c == ".")
        path = self.home.files / f"{file_id}{suffix or '.dat'}"  # the name never comes from the client
        with atomic_outputs() as group, group.open(path, "wb") as out:
            written = 0
            while chunk := fileobj.read(1 << 20):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise BackendError(
                        f"the file is larger than this server's upload limit ({max_bytes:,} bytes)",
                        code="file_too_large",
                        param="file",
                        status=413,
                    )
                out.write(chunk)  # type: ignore[arg-type]
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

    def page(
        self, *, purpose: str | None = None, limit: int = 10_000, after: str | None = None, order: str = "desc"
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of files, newest first (``order="asc"``: oldest first), after the file ``after``."""
        desc = order == "desc"
        where, params = [], []
        if purpose:
            where.append("purpose = ?")
            params.append(purpose)
        if after:
            cur = self.store.query("SELECT rowid AS r, created_at FROM files WHERE id = ?", (after,))
            if not cur:
                raise NotFoundError(f"No such File object: {after}", code="file_not_found", param="after")
            op = "<" if desc else ">"
            where.append(f"(created_at {op} ? OR (created_at = ? AND rowid {op} ?))")
            params += [cur[0]["created_at"], cur[0]["created_at"], cur[0]["r"]]
        sql = "SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
        direction = "DESC" if desc else "ASC"
        rows = self.store.query(
            f"{sql} ORDER BY created_at {direction}, rowid {direction} LIMIT ?", [*params, limit + 1]
        )
        return rows[:limit], len(rows) > limit

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        if purpose:
            return self.page(purpose=purpose)[0]
        return self.page()[0]

    def delete(self, file_id: str) -> bool:
        row = self.retrieve(file_id)
        self.store.delete("files", row["id"])
        try:
            os.unlink(row["path"])
        except FileNotFoundError:
            pass
        return True

    def check(self, file_id: str, *, model: str | None = None, n_epochs: int | str | None = None) -> dict[str, Any]:
        """What ``validate`` and ``stats`` say of an uploaded file, before a job is started on it
        (the dashboard's "create a job" page shows it; any client may ask). The findings name
        the file by its upload name, never by its path on the server's disk."""
        from ..data.analysis import analyze_file
        from ..data.stats import stats_dict

        row = self.retrieve(file_id)
        path = self.path(file_id)
        if not path.is_file():
            raise NotFoundError(f"The content of file {file_id} is gone from the server's disk", code="file_not_found")
        try:
            report = analyze_file(path, model, workers=1)
        except DataError as exc:  # the whole file is unusable: the same error, naming the upload
            raise DataError(
                exc.detail, path=row["filename"], line=exc.line, field=exc.field, hint=exc.hint, code=exc.code
            ) from None
        stats = stats_dict(report, n_epochs)
        stats["file"] = row["filename"]
        findings = [{**f.as_dict(), "path": row["filename"]} for f in report.findings]
        counts = dict(report.finding_counts)
        return {
            "object": "file.check",
            "id": row["id"],
            "filename": row["filename"],
            "ok": report.n_errors == 0,
            "n_errors": report.n_errors,
            "n_warnings": sum(n for k, n in counts.items() if k.startswith("warning:")),
            "counts": counts,
            "findings": findings,  # at most 100 of each kind, as validate prints them
            "stats": stats,
        }

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
