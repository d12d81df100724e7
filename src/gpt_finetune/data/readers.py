"""Streaming readers that keep memory flat and remember line numbers.

JSONL is read line by line in binary, each line bounded by :data:`MAX_RECORD_BYTES`, so a
50 MB line is an error rather than a 50 MB allocation. A JSON array (the seed's raw format) is
parsed element by element with the standard library's C decoder (``raw_decode``) over a sliding
buffer. We do not use ijson here: its errors carry no line numbers, and errors must name the line.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DataError

MAX_RECORD_BYTES = 8 * 1024 * 1024  # one example; OpenAI's largest context is ~65k tokens (~300 kB)
_CHUNK = 1 << 20
_WS = " \t\r\n"
MAX_INT_DIGITS = 4300  # Python's own limit for int(str): past it int() raises a bare ValueError


class JsonValueError(ValueError):
    """Valid to Python's json module, but not JSON a later step (or another parser) can use:
    NaN and Infinity, integers past Python's digit limit, lone surrogates in strings."""


def _constant(name: str) -> Any:
    raise JsonValueError(f"invalid JSON: {name} is not a JSON value (write null or a number)")


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonValueError(f"invalid JSON: an integer of {len(text):,} digits (at most {MAX_INT_DIGITS:,})")
    return int(text)


# the standard decoder with the rule that what is read here can be written back as JSON and as UTF-8
DECODER = json.JSONDecoder(parse_constant=_constant, parse_int=_integer)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_text(value: Any, text: str) -> Any:
    """Refuse a decoded value holding a lone surrogate (``"\\ud800"``), which cannot be written as
    UTF-8. Only text with such an escape is checked, so the common case costs one regex scan."""
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JsonValueError("invalid JSON: a lone surrogate (\\ud800-\\udfff) is not text") from None
    return value


def loads(text: str) -> Any:
    """``json.loads`` by the rule above: raises JSONDecodeError, JsonValueError or RecursionError."""
    return check_text(DECODER.decode(text), text)


def sniff(path: str | Path) -> str:
    """The container format: ``json`` (a JSON array or one object), ``jsonl``, ``csv`` or ``tsv``.

    Raises DataError for a missing or empty file."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096)
    except FileNotFoundError:
        raise DataError("file does not exist", path=p) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a file", path=p) from None
    stripped = head.lstrip(b"\xef\xbb\xbf" + _WS.encode())
    if not stripped:
        raise DataError("file is empty", path=p, hint="it must hold at least one example", code="invalid_n_examples")
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if stripped[:1] == b"[":
        return "json"
    if stripped[:1] == b"{":
        first_line = stripped.split(b"\n", 1)[0].strip()
        if first_line == b"{" and suffix != ".jsonl":
            return "json"  # a pretty-printed single object
        return "jsonl"
    raise DataError(
        f"does not look like JSON, JSONL, CSV or TSV (starts with {stripped[:20]!r})",
        path=p,
        line=1,
        hint="name CSV/TSV files *.csv/*.tsv, or choose the format with --format",
    )


def iter_lines(path: str | Path, fh: BinaryIO | None = None) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of a file with their 1-based numbers, each at most MAX_RECORD_BYTES."""
    own = fh is None
    f = open(path, "rb") if fh is None else fh
    try:
        lineno = 0
        while True:
            line = f.readline(MAX_RECORD_BYTES + 1)
            if not line:
                return
            lineno += 1
            if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
                raise DataError(
                    f"line is longer than {MAX_RECORD_BYTES // (1024 * 1024)} MiB",
                    path=path,
                    line=lineno,
                    hint="one example per line; an example this large exceeds every model's context",
                )
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                yield lineno, line
    finally:
        if own:
            f.close()


def iter_blocks(path: str | Path, block_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """Whole lines in blocks of about ``block_size`` bytes, with the number of each block's first
    line. The parent of a worker pool only counts newlines (C speed); workers split the lines."""
    with open(path, "rb") as f:
        lineno = 1
        carry = b""
        while True:
            data = f.read(block_size)
            if not data:
                if carry:
                    yield lineno, carry
                return
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) > MAX_RECORD_BYTES:
                    raise DataError(
                        f"line is longer than {MAX_RECORD_BYTES // (1024 * 1024)} MiB",
                        path=path,
                        line=lineno,
                        hint="one example per line; an example this large exceeds every model's context",
                    )
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            yield lineno, block
            lineno += block.count(b"\n")


def split_block(path: str | Path, first: int, block: bytes) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a block from :func:`iter_blocks`, numbered."""
    for i, line in enumerate(block.split(b"\n")):
        if len(line) > MAX_RECORD_BYTES:
            raise DataError(f"line is longer than {MAX_RECORD_BYTES // (1024 * 1024)} MiB", path=path, line=first + i)
        if first + i == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if line.strip():
            yield first + i, line


def open_input(path: str | Path) -> BinaryIO:
    """Open a file the user named for reading, or raise DataError saying why not."""
    p = Path(path)
    if p.is_dir():
        raise DataError("is a directory, not a file", path=path, hint="name a file")
    try:
        return open(p, "rb")
    except FileNotFoundError:
        raise DataError("no such file", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read it: {exc.strerror}", path=path) from None


def decode_line(path: str | Path, lineno: int, line: bytes) -> Any:
    """Decode one JSONL line, raising DataError naming the line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})",
            path=path,
            line=lineno,
            hint="convert the file to UTF-8, for example with iconv",
        ) from None
    try:
        return loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(json_error_message(exc, text, lineno == 1), path=path, line=lineno) from None
    except JsonValueError as exc:
        raise DataError(str(exc), path=path, line=lineno) from None
    except RecursionError:
        raise DataError(TOO_DEEP, path=path, line=lineno) from None


TOO_DEEP = "invalid JSON: nested too deeply (thousands of levels) to be an example"


def json_error_message(exc: json.JSONDecodeError, text: str, first: bool) -> str:
    stripped = text.strip()
    if first and stripped in ("[", "{"):
        return "invalid JSON: this looks like a pretty-printed JSON document, not JSONL (one object per line)"
    if exc.pos >= len(text.rstrip()) - 1:
        return f"invalid JSON, cut short at column {exc.colno} (truncated?): {exc.msg}"
    return f"invalid JSON at column {exc.colno}: {exc.msg}"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    for lineno, line in iter_lines(path):
        yield lineno, decode_line(path, lineno, line)


def iter_json_array(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array (or a single object) with the line each starts on."""
    decoder = DECODER
    with open(path, "rb") as fh:
        reader = _TextWindow(fh, path)
        reader.skip_ws()
        ch = reader.peek()
        if ch == "{":  # one object, not an array
            line, obj = reader.decode_value(decoder)
            yield line, obj
            reader.skip_ws()
            if reader.peek():
                raise DataError(
                    "extra data after the first JSON object; for one object per line use JSONL (*.jsonl)",
                    path=path,
                    line=reader.line,
                )
            return
        if ch != "[":
            raise DataError("expected a JSON array '['", path=path, line=reader.line)
        reader.advance(1)
        reader.skip_ws()
        if reader.peek() == "]":
            return
        while True:
            line, obj = reader.decode_value(decoder)
            yield line, obj
            reader.skip_ws()
            ch = reader.peek()
            if ch == ",":
                reader.advance(1)
                reader.skip_ws()
                if reader.peek() == "]":  # a trailing comma: common in hand-written files
                    raise DataError("trailing comma before ']'", path=path, line=reader.line)
                continue
            if ch == "]":
                reader.advance(1)
                reader.skip_ws()
                if reader.peek():
                    raise DataError("extra data after the closing ']'", path=path, line=reader.line)
                return
            if not ch:
                raise DataError(
                    "unexpected end of file: the JSON array is not closed (truncated?)", path=path, line=reader.line
                )
            raise DataError(f"expected ',' or ']' between array elements, found {ch!r}", path=path, line=reader.line)


class _TextWindow:
    """A sliding window of decoded text over a binary file, counting lines as it moves."""

    def __init__(self, fh: BinaryIO, path: str | Path) -> None:
        self.fh = fh
        self.path = path
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0
        self.line = 1
        self.eof = False
        self._bytes_line = 1  # lines in bytes already decoded, for UTF-8 error positions

    def _fill(self, want: int = _CHUNK) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(want)
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            line = self._bytes_line + chunk[: max(exc.start, 0)].count(b"\n")
            raise DataError(
                "not UTF-8 text", path=self.path, line=line, hint="convert the file to UTF-8, for example with iconv"
            ) from None
        self._bytes_line += chunk.count(b"\n")
        if not chunk:
            self.eof = True
        self.buf = self.buf[self.pos :] + text
        self.pos = 0
        return bool(chunk)

    def peek(self) -> str:
        while self.pos >= len(self.buf):
            if not self._fill():
                return ""
        return self.buf[self.pos]

    def advance(self, n: int) -> None:
        self.line += self.buf.count("\n", self.pos, self.pos + n)
        self.pos += n

    def skip_ws(self) -> None:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                if self.buf[self.pos] == "\n":
                    self.line += 1
                self.pos += 1
            if self.pos < len(self.buf) or not self._fill():
                return

    def decode_value(self, decoder: json.JSONDecoder) -> tuple[int, Any]:
        start_line = self.line
        want = _CHUNK
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
                check_text(obj, self.buf[self.pos : end])
            except RecursionError:
                raise DataError(TOO_DEEP, path=self.path, line=start_line) from None
            except JsonValueError as exc:
                raise DataError(str(exc), path=self.path, line=start_line) from None
            except json.JSONDecodeError as exc:
                incomplete = exc.pos >= len(self.buf) - 1 or exc.msg.startswith("Unterminated string")
                if incomplete and not self.eof:
                    if len(self.buf) - self.pos > MAX_RECORD_BYTES:
                        raise DataError(
                            f"record is larger than {MAX_RECORD_BYTES // (1024 * 1024)} MiB",
                            path=self.path,
                            line=start_line,
                        ) from None
                    self._fill(want)
                    want *= 2
                    continue
                err_line = start_line + self.buf.count("\n", self.pos, exc.pos)
                if incomplete:
                    msg = f"unexpected end of file inside a JSON value (truncated?): {exc.msg}"
                else:
                    msg = f"invalid JSON: {exc.msg}"
                raise DataError(msg, path=self.path, line=err_line) from None
            if end >= len(self.buf) and not self.eof:
                # a number at the very end of the buffer may continue in the next chunk
                self._fill(want)
                continue
            self.advance(end - self.pos)
            return start_line, obj


def iter_csv(path: str | Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        fh = open(path, encoding="utf-8-sig", newline="")
        with fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            if not reader.fieldnames:
                raise DataError("no header row", path=path, line=1)
            line_before = 1
            for row in reader:
                if None in row:
                    raise DataError(
                        f"has {len(reader.fieldnames) + len(row[None])} fields, the header has {len(reader.fieldnames)}",  # type: ignore[call-overload]
                        path=path,
                        line=line_before + 1,
                    )
                missing = [k for k, v in row.items() if v is None]
                if missing:  # DictReader fills a short row with None: never let that reach a prompt
                    raise DataError(
                        f"has {len(reader.fieldnames) - len(missing)} fields, the header has {len(reader.fieldnames)}",  # type: ignore[arg-type]
                        path=path,
                        line=line_before + 1,
                        field=missing[0],
                    )
                yield line_before + 1, row
                line_before = reader.line_num
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", path=path, hint="convert the file to UTF-8, for example with iconv") from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV: {exc}", path=path) from None


def iter_records(path: str | Path, container: str | None = None) -> Iterator[tuple[int, Any]]:
    """Records of any supported container, with the line each starts on."""
    container = container or sniff(path)
    if container == "jsonl":
        return iter_jsonl(path)
    if container == "json":
        return iter_json_array(path)
    if container in ("csv", "tsv"):
        return iter_csv(path, "," if container == "csv" else "\t")
    raise ValueError(container)


def first_record(path: str | Path, container: str) -> Any:
    for _line, record in iter_records(path, container):
        return record
    return None


__all__ = ["MAX_RECORD_BYTES", "decode_line", "iter_json_array", "iter_jsonl", "iter_lines", "iter_records", "sniff"]
