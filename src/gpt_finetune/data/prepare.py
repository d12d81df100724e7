"""``prepare``: raw data in, OpenAI chat JSONL out (plus a label sidecar and an optional split).

Streams its input; JSONL input is converted in worker processes. All outputs are written to
temporary files and renamed only when everything succeeded, so a failed run leaves no partial
file and an existing output untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_outputs
from ..errors import DataError
from .convert import ConvertOptions, convert_record, detect_record_format
from .labels import labels_sidecar_path
from .parallel import PARALLEL_MIN_BYTES, parallel_map
from .readers import decode_line, first_record, iter_blocks, iter_records, sniff, split_block


@dataclass
class PrepareResult:
    output: str
    n_examples: int
    record_format: str
    validation_output: str | None = None
    n_train: int = 0
    n_valid: int = 0
    labels_path: str | None = None
    label_counts: Counter[str] = field(default_factory=Counter)


def validation_path_for(output: str) -> str:
    """``out.jsonl`` -> ``out.valid.jsonl``."""
    base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return base + ".valid.jsonl"


def _dump(example: dict[str, Any]) -> str:
    return json.dumps(example, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def convert_block(block: tuple[int, bytes], fmt: str, opts: ConvertOptions, path: str) -> list[tuple[str, list[str]]]:
    out = []
    for lineno, raw in split_block(path, *block):
        record = decode_line(path, lineno, raw)
        converted = convert_record(record, fmt, opts, path, lineno)
        out.append((_dump(converted.example), converted.labels))
    return out


def _converted(
    path: str, container: str, fmt: str, opts: ConvertOptions, workers: int
) -> Iterator[tuple[str, list[str]]]:
    if container == "jsonl":
        if workers == 0 and os.path.getsize(path) < PARALLEL_MIN_BYTES:
            workers = 1
        for results in parallel_map(convert_block, iter_blocks(path), fmt, opts, path, workers=workers):
            yield from results
    else:
        for lineno, record in iter_records(path, container):
            converted = convert_record(record, fmt, opts, path, lineno)
            yield _dump(converted.example), converted.labels


def prepare(
    input_path: str | Path,
    output_path: str | Path,
    *,
    options: ConvertOptions | None = None,
    record_format: str | None = None,
    split: float | None = None,
    seed: int = 0,
    validation_output: str | Path | None = None,
    workers: int = 0,
) -> PrepareResult:
    opts = options or ConvertOptions()
    src, out = str(input_path), str(output_path)
    if split is not None and not 0 < split < 1:
        raise DataError(f"--split must be between 0 and 1 (exclusive), got {split}", hint="for example --split 0.1")
    container = sniff(src)
    if record_format in (None, "auto"):
        record_format = detect_record_format(first_record(src, container), container)
    label_counts: Counter[str] = Counter()
    valid_out = str(validation_output) if validation_output else validation_path_for(out) if split else None
    result = PrepareResult(out, 0, record_format, valid_out)
    with atomic_outputs(inputs=[src]) as group:
        # every output is checked before anything is read or written
        group.reserve(out, valid_out, labels_sidecar_path(out) if opts.task_type == "classification" else None)
        if split is None:
            with group.open(out) as fh:
                for line, labels in _converted(src, container, record_format, opts, workers):
                    fh.write(line)
                    result.n_examples += 1
                    label_counts.update(labels)
            result.n_train = result.n_examples
        else:
            assert valid_out is not None
            _write_split(
                src, container, record_format, opts, workers, group, out, valid_out, split, seed, result, label_counts
            )
        if result.n_examples == 0:
            raise DataError("no examples in the input", path=src, code="invalid_n_examples")
        if opts.task_type == "classification":
            result.labels_path = labels_sidecar_path(out)
            sidecar = {
                "task_type": "classification",
                "label_format": opts.label_format,
                "labels": sorted(label_counts),
                "counts": dict(sorted(label_counts.items())),
                "n_examples": result.n_examples,
                "source": os.path.basename(src),
            }
            with group.open(result.labels_path) as fh:
                json.dump(sidecar, fh, ensure_ascii=False, indent=1)
                fh.write("\n")
    result.label_counts = label_counts
    return result


def _write_split(
    src: str,
    container: str,
    fmt: str,
    opts: ConvertOptions,
    workers: int,
    group: Any,
    out: str,
    valid_out: str,
    split: float,
    seed: int,
    result: PrepareResult,
    label_counts: Counter[str],
) -> None:
    """Two passes: convert to a temporary file while noting each example's label set, then choose
    the validation examples per label set (stratified) and distribute. Memory: one int each."""
    import numpy as np

    keys: dict[str, int] = {}
    key_ids: list[int] = []
    tmp_dir = os.path.dirname(os.path.abspath(out))
    with tempfile.TemporaryFile("w+", encoding="utf-8", dir=tmp_dir) as tmp:
        for line, labels in _converted(src, container, fmt, opts, workers):
            tmp.write(line)
            label_counts.update(labels)
            key = "\x1f".join(sorted(labels))
            key_ids.append(keys.setdefault(key, len(keys)))
        ids = np.asarray(key_ids, dtype=np.int32)
        del key_ids
        rng = np.random.default_rng(seed)
        is_valid = np.zeros(len(ids), dtype=bool)
        for g, n_valid in enumerate(_allocate(np.bincount(ids, minlength=len(keys)), split)):
            if n_valid:
                members = np.nonzero(ids == g)[0]
                is_valid[rng.choice(members, size=n_valid, replace=False)] = True
        tmp.seek(0)
        with group.open(out) as train_fh, group.open(valid_out) as valid_fh:
            for i, line in enumerate(tmp):
                (valid_fh if is_valid[i] else train_fh).write(line)
        result.n_examples = len(ids)
        result.n_valid = int(is_valid.sum())
        result.n_train = result.n_examples - result.n_valid
    if result.n_examples and result.n_valid == 0:
        raise DataError(
            f"--split {split} leaves no validation examples from {result.n_examples}",
            path=src,
            hint="use a larger --split or more data",
        )


def _allocate(sizes: Any, split: float) -> list[int]:
    """Validation examples per label set: proportional, largest remainders first, so the total is
    round(n * split); a label set keeps at least one example in training."""
    total = int(round(int(sizes.sum()) * split))
    exact = [int(n) * split for n in sizes]
    quota = [min(int(e), max(int(n) - 1, 0)) for e, n in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - int(exact[g])), -int(sizes[g]), g))
    missing = total - sum(quota)
    for g in order:
        if missing <= 0:
            break
        if quota[g] < int(sizes[g]) - 1:
            quota[g] += 1
            missing -= 1
    return quota
