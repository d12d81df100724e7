"""Atomic file output: write to a temporary file beside the target, fsync, then rename.

A failed run leaves no partial file and never clobbers what was there. ``AtomicGroup`` commits
several outputs together (training file, validation file, label sidecar) so that on any error
(power loss aside) every existing file is as it was:

- before anything is written, every output is resolved to its real path (following symlinks)
  and refused if it is an input of the run, another output of the run, or a directory, or if its
  directory is missing or not writable: one clear error, nothing touched;
- a symlink is followed: the file it points to is replaced, the link stays a link;
- a target that is not a regular file (``/dev/null``, a FIFO) is written through, not replaced;
- commit first links each existing target to a backup, then renames every temporary file over
  its target; if a rename fails, the targets already replaced are restored from their backups.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import DataError


def real_path(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


class AtomicGroup:
    def __init__(self, inputs: Iterable[str | Path] = ()) -> None:
        self._inputs = {real_path(p): str(p) for p in inputs}
        self._outputs: dict[str, str] = {}
        self._reserved: set[str] = set()
        self._pending: list[tuple[Path, Path]] = []
        self._direct: list[IO[str]] = []

    def reserve(self, *targets: str | Path | None) -> None:
        """Check every output of the run before anything is read or written."""
        for target in targets:
            if target is not None:
                self._reserved.add(self.check(target))

    def check(self, target: str | Path) -> str:
        """Refuse an output that would destroy an input or another output; returns its real path."""
        real = real_path(target)
        if real in self._reserved:  # checked already, by reserve(): now opened
            self._reserved.discard(real)
            return real
        if real in self._inputs:
            raise DataError(
                f"output would overwrite the input {self._inputs[real]}", path=target, hint="choose another output path"
            )
        if real in self._outputs:
            raise DataError(
                f"two outputs of this run are the same file ({self._outputs[real]})",
                path=target,
                hint="give each output its own path",
            )
        if os.path.isdir(real):
            raise DataError("is a directory, not a file", path=target, hint="give a file name")
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise DataError(f"directory {parent} does not exist", path=target, hint="create it first")
        if not os.access(parent, os.W_OK | os.X_OK) and _regular_or_missing(real):
            raise DataError(f"cannot write in directory {parent} (permission denied)", path=target)
        self._outputs[real] = str(target)
        return real

    def open(self, target: str | Path, mode: str = "w") -> IO[str]:
        real = self.check(target)
        if not _regular_or_missing(real):  # /dev/null, a FIFO: write through, there is nothing to replace
            fh = open(real, mode) if "b" in mode else open(real, mode, encoding="utf-8", newline="\n")
            self._direct.append(fh)
            return fh
        path = Path(real)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:
            raise DataError(f"cannot write in directory {path.parent}: {exc.strerror}", path=target) from None
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
        for fh in self._direct:
            fh.close()
        self._direct.clear()
        backups: list[tuple[Path, Path | None]] = []  # (target, its backup or None if it was new)
        try:
            for tmp, _ in self._pending:  # a full disk often shows only here
                with open(tmp, "rb") as written:
                    os.fsync(written.fileno())
            for _, target in self._pending:
                backups.append((target, _backup(target)))
            done: list[int] = []
            try:
                for k, (tmp, target) in enumerate(self._pending):
                    os.replace(tmp, target)
                    done.append(k)
            except OSError:
                for k in done:  # put back what was there
                    target, backup = backups[k]
                    if backup is not None:
                        os.replace(backup, target)
                    else:
                        target.unlink(missing_ok=True)
                raise
        except OSError:
            self.discard()
            for _, backup in backups:
                if backup is not None:
                    backup.unlink(missing_ok=True)
            raise
        for _, backup in backups:
            if backup is not None:
                backup.unlink(missing_ok=True)
        for directory in {target.parent for _, target in self._pending}:
            _fsync_dir(directory)
        self._pending.clear()

    def discard(self) -> None:
        for fh in self._direct:
            fh.close()
        self._direct.clear()
        for tmp, _ in self._pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._pending.clear()


def _regular_or_missing(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


def _backup(target: Path) -> Path | None:
    """A hard link to the target's current content (a copy where links are not possible)."""
    if not target.exists():
        return None
    backup = target.parent / f".{target.name}.{secrets.token_hex(6)}.bak"
    try:
        os.link(target, backup)
    except OSError:
        import shutil

        shutil.copy2(target, backup)
    return backup


@contextmanager
def atomic_outputs(inputs: Iterable[str | Path] = ()) -> Iterator[AtomicGroup]:
    group = AtomicGroup(inputs)
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
