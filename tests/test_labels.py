from __future__ import annotations

import pytest

from gpt_finetune.data.labels import LabelError, format_labels, parse_labels


@pytest.mark.parametrize(
    "text, expected",
    [
        ("['proxy', 'transit']", ["proxy", "transit"]),
        ('["proxy", "transit"]', ["proxy", "transit"]),
        ("bug", ["bug"]),
        ("bug, feature", ["bug", "feature"]),
        ("'proxy','transit'", ["proxy", "transit"]),
        (" ['ovs', 'ovs', ' windows '] ", ["ovs", "windows"]),
        ("('a', 'b')", ["a", "b"]),
    ],
)
def test_parse(text, expected):
    assert parse_labels(text) == expected


@pytest.mark.parametrize("text", ["", "[]", "['a',", "[1, [2]]", "a,,b"])
def test_parse_rejects(text):
    with pytest.raises(LabelError):
        parse_labels(text)


def test_plain_text_is_one_label_never_code():
    assert parse_labels("__import__('os')") == ["__import__('os')"]


def test_never_evaluates_code():
    # a call expression is not a literal: literal_eval refuses it, and it is not a list either
    with pytest.raises(LabelError):
        parse_labels("[__import__('os').getcwd()]")


@pytest.mark.parametrize("style", ["seed", "json", "comma"])
def test_every_format_parses_back(style):
    labels = ["proxy", "network-policy"]
    assert parse_labels(format_labels(labels, style)) == labels


def test_seed_format_is_what_the_seed_tool_wrote():
    assert format_labels(["proxy", "transit"], "seed") == "'proxy','transit'"


@pytest.mark.parametrize(("label", "style"), [("it's", "seed"), ("a,b", "comma"), ("x, y", "comma"), ("x, y", "seed")])
def test_a_label_a_format_cannot_carry_is_refused_naming_it(label, style):
    with pytest.raises(LabelError, match=rf"label {label!r} cannot be written in the {style} label format") as err:
        format_labels(["ok", label], style)
    if style != "json":
        assert "json" in str(err.value)
    assert parse_labels(format_labels(["ok", label], "json")) == ["ok", label]
