"""``-`` as a file name: standard input for the data commands' inputs, standard output for
``prepare``'s output, as Unix tools do (``cat raw.json | gpt-finetune prepare -i - -o -``).

The data layer reads a file more than once (it sniffs the head, then streams the records, in
parallel blocks for large files), which a pipe does not allow, so standard input is first copied
to a private temporary file; standard output is written through one in the same way, so a failed
run prints nothing rather than half a file. Errors and findings name ``<stdin>``, never the
temporary path.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError

STDIO = "-"
STDIN_NAME = "<stdin>"
STDOUT_NAME = "<stdout>"
_CHUNK = 1 << 20


class Spool:
    """Paths for the data layer in place of ``-``, and how to show them."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.names: dict[str, str] = {}

    def stdin(self, path: str, suffix: str = "") -> str:
        """``path``, or for ``-`` a temporary copy of standard input (``suffix`` picks its
        container where the format says it, e.g. ``.csv``)."""
        if path != STDIO:
            return path
        if STDIN_NAME in self.names.values():
            raise DataError("standard input ('-') can be read only once", hint="give the other data as a file")
        tmp = str(self.dir / f"stdin{suffix}")
        with open(tmp, "wb") as fh:
            shutil.copyfileobj(sys.stdin.buffer, fh, _CHUNK)
        self.names[tmp] = STDIN_NAME
        return tmp

    def stdout(self, path: str) -> str:
        """``path``, or for ``-`` a temporary file that :meth:`flush` copies to standard output."""
        if path != STDIO:
            return path
        tmp = str(self.dir / "stdout.jsonl")
        self.names[tmp] = STDOUT_NAME
        return tmp

    def shown(self, path: Any) -> Any:
        """The name to show for a path (``<stdin>``, ``<stdout>`` or itself)."""
        return self.names.get(str(path), path) if path is not None else None

    def flush(self) -> None:
        """Copy the ``-`` output, once complete, to standard output."""
        for tmp, name in self.names.items():
            if name == STDOUT_NAME and Path(tmp).exists():
                sys.stdout.flush()
                with open(tmp, "rb") as fh:
                    shutil.copyfileobj(fh, sys.stdout.buffer, _CHUNK)
                sys.stdout.buffer.flush()


@contextlib.contextmanager
def spooled() -> Iterator[Spool]:
    """A :class:`Spool` whose temporary files go when the block ends; a DataError about one of
    them is raised again naming ``<stdin>``/``<stdout>``."""
    with tempfile.TemporaryDirectory(prefix="gpt-finetune-stdio-") as d:
        spool = Spool(d)
        try:
            yield spool
        except DataError as exc:
            if exc.path is None or exc.path not in spool.names:
                raise
            raise DataError(
                exc.detail,
                path=spool.names[exc.path],
                line=exc.line,
                field=exc.field,
                hint=exc.hint,
                code=exc.code,
            ) from None
