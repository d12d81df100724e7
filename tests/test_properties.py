"""Property-based tests of the parsers that face users: any input either parses or gives the
project's own DataError / ConfigError / LabelError, never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpt_finetune.data.checks import check_block  # noqa: E402
from gpt_finetune.data.convert import ConvertOptions, convert_record  # noqa: E402
from gpt_finetune.data.labels import LABEL_FORMATS, LabelError, format_labels, parse_labels  # noqa: E402
from gpt_finetune.data.readers import iter_records, sniff  # noqa: E402
from gpt_finetune.errors import ConfigError, DataError  # noqa: E402
from gpt_finetune.settings import KEYS, load_settings  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
label_text = st.text(min_size=1, max_size=20).filter(lambda t: t.strip() != "")


@FAST
@given(st.lists(label_text.map(str.strip), min_size=1, max_size=4, unique=True), st.sampled_from(LABEL_FORMATS))
def test_labels_round_trip_or_are_refused(labels, style):
    try:
        text = format_labels(labels, style)
    except LabelError as exc:
        assert "cannot be written" in str(exc)
        return
    assert parse_labels(text) == labels  # never written to read back differently


@FAST
@given(st.text(max_size=60))
def test_parse_labels_gives_labels_or_a_label_error(text):
    try:
        labels = parse_labels(text)
    except LabelError:
        return
    assert labels and all(isinstance(x, str) and x == x.strip() and x for x in labels)


def _write(data: bytes, suffix: str) -> Path:
    fh = tempfile.NamedTemporaryFile(delete=False, suffix=suffix)
    fh.write(data)
    fh.close()
    return Path(fh.name)


json_like = st.one_of(
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=10,
    ).map(lambda v: __import__("json").dumps(v).encode()),
)


@FAST
@given(st.lists(json_like, max_size=4), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_readers_and_conversion_give_records_or_a_data_error(lines, suffix):
    path = _write(b"\n".join(lines), suffix)
    opts = ConvertOptions(task_type="classification", prompt_columns=("a",), label_column="b")
    try:
        container = sniff(path)
        for line, record in iter_records(path, container):
            for fmt in ("seed", "openai", "alpaca") if container != "csv" else ("csv",):
                try:
                    convert_record(record, fmt, opts, str(path), line)
                except DataError:
                    pass
    except DataError:
        pass
    finally:
        path.unlink()


@FAST
@given(st.lists(json_like, max_size=6))
def test_validation_checks_any_line_without_raising(lines):
    data = b"\n".join(lines) + b"\n"
    path = _write(data, ".jsonl")
    try:
        result = check_block((1, data), "cl100k_base", str(path))
        assert result.n_lines <= data.count(b"\n")  # a generated line may hold newlines itself
        assert all(f.severity in ("error", "warning") for f in result.findings)
    finally:
        path.unlink()


@FAST
@given(
    st.lists(
        st.tuples(st.sampled_from([*sorted(KEYS), "unknown_key", "#", ""]), st.text(max_size=15)),
        max_size=6,
    )
)
def test_config_files_parse_or_give_a_config_error(pairs):
    text = "".join(f"{k} = {v}\n" for k, v in pairs if "\n" not in v and "\r" not in v)
    path = _write(text.encode(), ".cfg")
    try:
        settings_ = load_settings({}, config_file=path, env={}, default_config=path.with_suffix(".none"))
        for key in KEYS:
            value = getattr(settings_, key)
            if isinstance(value, float):
                assert value == value and value not in (float("inf"), float("-inf"))  # finite: jobs print JSON
    except ConfigError:
        pass
    finally:
        path.unlink()
