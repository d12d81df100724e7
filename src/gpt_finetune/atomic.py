"""Atomic file output: write to a temporary file beside the target, fsync, then rename.

A failed run leaves no partial file and never clobbers what was there. ``AtomicGroup`` commits
several outputs together (training file, validation file, label sidecar): if anything fails
before the commit, none of them appears.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


class AtomicGroup:
    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def open(self, target: str | Path, mode: str = "w") -> IO[str]:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp makes the file private (0600); give it the mode of the file it replaces, or
        # what a plain open() would give (0666 less the umask)
        try:
            perms = path.stat().st_mode & 0o777
        except FileNotFoundError:
            perms = 0o666 & ~_umask()
        os.chmod(tmp, perms)
        self._pending.append((Path(tmp), path))
        if "b" in mode:
            return os.fdopen(fd, mode)  # type: ignore[return-value]
        return os.fdopen(fd, mode, encoding="utf-8", newline="\n")

    def commit(self) -> None:
        for tmp, target in self._pending:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        if self._pending:
            _fsync_dir(self._pending[0][1].parent)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._pending.clear()


@contextmanager
def atomic_outputs() -> Iterator[AtomicGroup]:
    group = AtomicGroup()
    try:
        yield group
    except BaseException:
        group.discard()
        raise
    group.commit()


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_outputs() as group, group.open(target) as fh:
        fh.write(text)


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_outputs() as group, group.open(target, "wb") as fh:
        fh.write(data)  # type: ignore[arg-type]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
