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
            value = settings_.value(key)
            if isinstance(value, float):
                assert value == value and value not in (float("inf"), float("-inf"))  # finite: jobs print JSON
    except ConfigError:
        pass
    finally:
        path.unlink()


class Raw(str):
    """JSON text written as it is (what json.dumps would not write, or not quickly)."""


ODD_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00", "\x00", "\u2028"]),  # lone surrogates, a pair, controls
    st.integers(),
    st.integers(min_value=4290, max_value=4310).map(lambda n: Raw("-" * (n % 2) + "9" * n)),  # Python's digit limit
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -0.0]),
    st.integers(min_value=1, max_value=3000).map(lambda depth: Raw("[" * depth + "]" * depth)),  # deep nesting
)


def _odd_line(where: str, value) -> bytes:
    import json

    raw = value if isinstance(value, Raw) else json.dumps(value)  # NaN, Infinity, \\ud800 escapes: as json writes them
    base = {"role": "user", "content": "PLACEHOLDER"}
    if where == "content":
        text = json.dumps(base).replace('"PLACEHOLDER"', raw)
    elif where == "extra":
        text = json.dumps({**base, "content": "q"}).replace("}", f', "weight_note": {raw}}}')
    else:
        text = json.dumps({**base, "content": "q"}).replace("}", f', "name": {raw}}}')
    return ('{"messages": [' + text + ', {"role": "assistant", "content": "\'a\'"}]}').encode()


@pytest.fixture(scope="module")
def local_counter():
    pytest.importorskip("transformers")
    from gpt_finetune.local.tokenizer import local_counter

    return local_counter()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(value=ODD_VALUES, where=st.sampled_from(["content", "extra", "name"]), at=st.integers(min_value=0, max_value=11))
def test_what_validate_accepts_every_later_step_handles(local_counter, value, where, at, tmp_path_factory):
    """The rule: a file validate accepts never fails prepare, stats (local counts included) or a
    job's file check for a data reason; and what prepare writes is JSON."""
    import json

    from gpt_finetune.data.analysis import analyze_file
    from gpt_finetune.data.prepare import prepare
    from gpt_finetune.data.readers import loads
    from gpt_finetune.services.jobs import JobService

    d = tmp_path_factory.mktemp("odd")
    good = [
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "'a'"}]}
        ).encode()
        for i in range(12)
    ]
    good[at] = _odd_line(where, value)
    path = d / "data.jsonl"
    path.write_bytes(b"\n".join(good) + b"\n")
    accepted = analyze_file(path, None, workers=1).n_errors == 0
    steps = {}
    for name, step in (
        ("prepare", lambda: prepare(path, d / "out.jsonl", workers=1)),
        ("stats", lambda: analyze_file(path, "gpt-4o-mini", workers=1, local=local_counter)),
        ("labels", lambda: JobService._label_sets(str(path))),
    ):
        try:
            step()
            steps[name] = True
        except DataError:
            steps[name] = False
    if accepted:
        assert all(steps.values()), steps
        # JSONL lines end at "\n" only: str.splitlines() would also cut at U+2028 inside a string
        for line in (d / "out.jsonl").read_text(encoding="utf-8").split("\n")[:-1]:
            loads(line)  # strict JSON, UTF-8 text
