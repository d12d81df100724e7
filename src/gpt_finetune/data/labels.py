"""Classification labels: parse them from what people write, format them as the model learns them.

The seed's raw data writes labels as a Python list literal, ``"['proxy', 'transit']"``. We parse
that with :func:`ast.literal_eval` (literals only, never ``eval``), and also accept JSON lists,
``bug`` and ``bug, feature``. Formats for the assistant message:

- ``seed`` (default, as the seed's tool wrote it: brackets and separator spaces removed):
  ``'proxy','transit'``
- ``json``: ``["proxy", "transit"]``
- ``comma``: ``proxy, transit``

Every format parses back to the same list, so evaluation and constrained inference can read any.
Label-by-label answers give each label a probability; per-label thresholds on it are tuned on
validation data here (``tune_thresholds``) and applied by the engine (``apply_thresholds``).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from itertools import pairwise

from ..contract import LABEL_FORMATS


class LabelError(ValueError):
    pass


def parse_labels(text: str) -> list[str]:
    """Labels in the order written, stripped and without duplicates. Raises LabelError."""
    s = text.strip()
    if not s:
        raise LabelError("no label (empty answer)")
    items: list[object] = []
    if s.startswith("[") or s.startswith("("):
        try:
            value = json.loads(s)
        except (ValueError, RecursionError):
            try:
                value = ast.literal_eval(s)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise LabelError(f"cannot parse {s[:80]!r} as a list of labels") from None
        if not isinstance(value, (list, tuple)):
            raise LabelError(f"{s[:80]!r} is not a list of labels")
        items = list(value)
    elif "," in s:
        items = list(s.split(","))
    else:
        items = [s]
    labels: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise LabelError(f"label {item!r} is not a string")
        label = str(item).strip()
        if len(label) >= 2 and label[0] == label[-1] and label[0] in "'\"":
            label = label[1:-1].strip()
        if not label:
            raise LabelError(f"empty label in {s[:80]!r}")
        if label not in labels:
            labels.append(label)
    if not labels:
        raise LabelError("no label (empty list)")
    return labels


def format_labels(labels: list[str], style: str = "seed") -> str:
    """Labels as the model is trained to write them. Every format must read back as the same
    labels (``parse_labels``); a label a format cannot carry (a comma in ``comma``, a quote in
    ``seed``) is refused with a LabelError naming it, never written to read back differently."""
    text = _format(labels, style)
    try:
        same = parse_labels(text) == labels
    except LabelError:
        same = False
    if not same:
        bad = next((x for x in labels if not _round_trips(x, style)), labels[0])
        better = next((f for f in LABEL_FORMATS if f != style and _round_trips(bad, f)), None)
        raise LabelError(
            f"label {bad!r} cannot be written in the {style} label format: it would read back differently"
            + (f"; the {better} format can carry it (--label-format {better})" if better else "")
        )
    return text


def _round_trips(label: str, style: str) -> bool:
    try:
        return parse_labels(_format([label], style)) == [label]
    except LabelError:
        return False


def _format(labels: list[str], style: str) -> str:
    if style == "seed":
        return ",".join("'" + label.replace("'", "\\'") + "'" for label in labels)
    if style == "json":
        return json.dumps(labels, ensure_ascii=False)
    if style == "comma":
        return ", ".join(labels)
    raise ValueError(f"unknown label format {style!r}; choose from {', '.join(LABEL_FORMATS)}")


def labels_sidecar_path(output: str) -> str:
    """``out.jsonl`` -> ``out.labels.json``: where prepare writes the label set."""
    base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return base + ".labels.json"


def guess_format(answers: list[str]) -> str | None:
    """The label format every answer is written in (each reads back the same), or None when the
    answers are not label lists in one of our formats."""
    for style in LABEL_FORMATS:
        try:
            if answers and all(format_labels(parse_labels(a), style) == a.strip() for a in answers):
                return style
        except LabelError:
            continue
    return None


MAX_LABEL_SETS = 256


def label_sets(answers: list[str]) -> dict[str, object] | None:
    """What constrained prediction needs from a training file's answers: the labels, their
    format and the label sets as written (first seen first); None if the answers are not labels
    or have too many distinct sets to choose among.

    The ``comma`` format reads almost any sentence as labels, so answers count as labels only
    where they also look like classification: every label short and on one line, and the answers
    repeating (at most half as many distinct sets as answers)."""
    style = guess_format(answers)
    if style is None:
        return None
    if any(len(x) > 64 or "\n" in x for a in answers for x in parse_labels(a)):
        return None
    if len(set(answers)) * 2 > len(answers):
        return None
    sets: list[str] = []
    labels: set[str] = set()
    for a in answers:
        written = format_labels(parse_labels(a), style)
        labels.update(parse_labels(a))
        if written not in sets:
            sets.append(written)
            if len(sets) > MAX_LABEL_SETS:
                return None
    return {"labels": sorted(labels), "label_format": style, "label_sets": sets}


def apply_thresholds(probs: Mapping[str, float], labels: Sequence[str], thresholds: Mapping[str, float]) -> list[str]:
    """The labels whose probability reaches their threshold (0.5 for a label without one), most
    likely first as the label-by-label search orders them; the most likely label when none does
    (a model always answers)."""
    chosen = sorted((x for x in labels if probs[x] >= thresholds.get(x, 0.5)), key=lambda x: -probs[x])
    return chosen or [max(labels, key=lambda x: probs[x])]


def tune_thresholds(
    references: Sequence[Sequence[str]], label_probs: Sequence[Mapping[str, float]], labels: Sequence[str]
) -> dict[str, float]:
    """Per label, the probability threshold that maximises that label's F1 on these (validation)
    answers: the midpoints between the observed probabilities are tried, and ties go to the
    threshold closest to 0.5. A label never present in the references keeps 0.5."""
    out = {}
    for x in labels:
        truth = [x in r for r in references]
        values = sorted({p[x] for p in label_probs})
        if not any(truth):
            out[x] = 0.5
            continue
        cuts = [(a + b) / 2 for a, b in pairwise(values)] or [0.5]
        best = (-1.0, 0.0, 0.5)
        for cut in cuts:
            guess = [p[x] >= cut for p in label_probs]
            tp = sum(g and t for g, t in zip(guess, truth))
            fp = sum(g and not t for g, t in zip(guess, truth))
            fn = sum(t and not g for g, t in zip(guess, truth))
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
            best = max(best, (f1, -abs(cut - 0.5), cut))
        out[x] = best[2]
    return out
