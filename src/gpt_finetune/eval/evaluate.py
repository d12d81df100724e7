"""Run models over held-out examples and score them side by side.

An example's prompt is its messages before the last assistant message, which is the reference.
Models are asked through a backend (``local``, or ``openai`` against OpenAI or any compatible
server, this project's included), greedily (temperature 0). Classification can also be
label-constrained: the model picks the most likely of the candidate label sets, written as it was
trained to write them (the ``structured_outputs.choice`` extension, as vLLM names it, sent in
``extra_body`` so that it reaches this project's server through the openai SDK too; an answer
outside the candidates means the server ignored it, which is an error, not a score).

Candidates for constrained prediction: the label sets that occur among the training answers
(``--train``), else each single label and the label sets of the references: the model chooses
among the combinations it has seen. Label by label (``label_choice``), any subset of the labels
can be answered, with each label's probability, on which per-label thresholds can be tuned
(``data.labels.tune_thresholds``, on validation data only).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backends.base import Backend
from ..contract import MAX_TOP_LOGPROBS, LabelChoice
from ..data.labels import LabelError, format_labels, guess_format, label_sets, labels_sidecar_path, parse_labels
from ..data.readers import loads
from ..errors import BackendError, DataError
from ..request_rules import choice_constraint, ignored_constraint, label_constraint


@dataclass
class Examples:
    prompts: list[list[dict[str, Any]]]
    references: list[str]
    task: str  # "classification" or "answering"
    labels: list[str] = field(default_factory=list)
    label_format: str = "seed"
    task_from: str = "given"  # "given" (--task), "labels" (a label file), "answers" (they look like labels), "default"

    def prompt_texts(self) -> list[str]:
        return [" \n".join(m["content"] for m in p if m["role"] in ("system", "user")) for p in self.prompts]

    def reference_labels(self) -> list[list[str]]:
        return [parse_labels(r) for r in self.references]


def read_examples(path: str | Path, *, labels_file: str | None = None, task: str | None = None) -> Examples:
    """Held-out chat examples, with the label set from ``labels_file``, from prepare's sidecar
    beside the data, or (classification asked, no label set) from the references.

    Without ``task`` or a label file, the examples are classification when their answers look
    like labels by the rule jobs use (``label_sets``: one label format, short labels, answers
    repeating), else answering."""
    prompts, refs = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                messages = loads(line)["messages"]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise DataError("not a chat example with messages", path=path, line=n) from None
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise DataError("no assistant message to use as the reference", path=path, line=n, field="messages")
            prompts.append(messages[:last])
            refs.append(str(messages[last].get("content") or ""))
    if not prompts:
        raise DataError("no examples", path=path)
    sidecar = Path(labels_file or labels_sidecar_path(str(path)))
    if not labels_file and not sidecar.is_file() and str(path).endswith(".valid.jsonl"):
        # prepare --split writes out.jsonl, out.valid.jsonl and one sidecar: out.labels.json
        sidecar = Path(labels_sidecar_path(str(path)[: -len(".valid.jsonl")] + ".jsonl"))
    label_set: list[str] = []
    style = None
    if sidecar.is_file():
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        label_set = list(info["labels"] if isinstance(info, dict) else info)
        style = info.get("label_format") if isinstance(info, dict) else None
        task_from = "given" if task else "labels"
        task = task or "classification"
    elif labels_file:
        raise DataError("label file not found", path=labels_file)
    elif task:
        task_from = "given"
    elif label_sets(refs) is not None:
        task, task_from = "classification", "answers"
    else:
        task, task_from = "answering", "default"
    ex = Examples(prompts, refs, task, task_from=task_from)
    if task == "classification":
        try:
            seen = ex.reference_labels()
        except LabelError as exc:
            raise DataError(f"a reference is not a label list: {exc}", path=path) from None
        ex.labels = label_set or sorted({x for labels in seen for x in labels})
        ex.label_format = style or guess_format(refs[:50]) or "seed"
    return ex


def candidates(ex: Examples, train: Examples | None = None) -> list[str]:
    """Label sets to choose among, each written in the training format."""
    sets: list[tuple[str, ...]] = []
    source = train.reference_labels() if train is not None else [[x] for x in ex.labels] + ex.reference_labels()
    for labels in source:
        key = tuple(labels)
        if key not in sets:
            sets.append(key)
    return [format_labels(list(s), ex.label_format) for s in sets]


def predict(
    backend: Backend,
    model: str,
    ex: Examples,
    *,
    choices: list[str] | None = None,
    max_tokens: int = 64,
    progress: Any = None,
    batch_size: int = 1,
    confidences: list[float | None] | None = None,
    label_choice: LabelChoice | None = None,
    label_probs: list[dict[str, float]] | None = None,
) -> list[str]:
    """The model's answer to each prompt: greedy, or constrained to ``choices``. Free answers of
    local models are generated ``batch_size`` prompts at a time. ``label_choice`` answers label
    by label: any subset of the labels. Constrained and label-by-label answers also give their
    confidence (the chosen answer's probability among the candidates, or among the answers the
    label search scored) into ``confidences`` when given, None where the server returns no
    logprobs; label by label, ``label_probs`` gets each label's probability of belonging in
    the answer."""
    if not choices and not label_choice and batch_size > 1 and backend.traits.batched_chat:
        return _predict_batched(backend, model, ex, max_tokens, batch_size, progress)
    want_logprobs = confidences is not None or label_probs is not None
    out = []
    for prompt in ex.prompts:
        params: dict[str, Any] = {"temperature": 0}
        if choices:
            params["extra_body"] = choice_constraint(choices)
            if confidences is not None:
                params["logprobs"] = True
        elif label_choice:
            params["extra_body"] = label_constraint(label_choice)
            if want_logprobs:
                params.update(logprobs=True, top_logprobs=min(len(label_choice.labels), MAX_TOP_LOGPROBS))
        else:
            params["max_tokens"] = max_tokens
        response: Any = backend.chat(model=model, messages=prompt, **params)
        answer = (response.choices[0].message.content or "").strip()
        if choices and (error := ignored_constraint(answer, choices, model)):
            raise error
        out.append(answer)
        if (choices or label_choice) and confidences is not None:
            confidences.append(_confidence(response))
        if label_choice and label_probs is not None:
            label_probs.append(_label_probs(response, label_choice))
        if progress is not None:
            progress.update(1)
    return out


def _logprob_content(response: Any) -> Any:
    logprobs = getattr(response.choices[0], "logprobs", None)
    return getattr(logprobs, "content", None) if logprobs is not None else None


def _confidence(response: Any) -> float | None:
    content = _logprob_content(response)
    return math.exp(content[0].logprob) if content else None


def _label_probs(response: Any, choice: LabelChoice) -> dict[str, float]:
    """Each label's probability from a label-by-label answer's top_logprobs (0 for a label the
    server left out of them)."""
    content = _logprob_content(response)
    if not content:
        raise BackendError(
            "the server returned no per-label probabilities for a label_choice request",
            hint="tuning thresholds needs gpt-finetune serve or the local backend",
        )
    found = {top.token: math.exp(top.logprob) for top in content[0].top_logprobs or []}
    return {x: found.get(x, 0.0) for x in choice.labels}


def _predict_batched(
    backend: Backend, model: str, ex: Examples, max_tokens: int, batch_size: int, progress: Any
) -> list[str]:
    """Through the chat service's batched path (as batch files are), ``batch_size`` at a time."""
    requests = [{"model": model, "messages": p, "max_tokens": max_tokens, "temperature": 0} for p in ex.prompts]
    out: list[str] = []
    for answer in backend.chat_many(requests, batch_size=batch_size):
        if isinstance(answer, Exception):
            raise answer
        out.append((answer["choices"][0]["message"]["content"] or "").strip())
    if progress is not None:
        progress.update(len(out))
    return out


def as_labels(answers: list[str]) -> list[list[str] | None]:
    out: list[list[str] | None] = []
    for a in answers:
        try:
            out.append(parse_labels(a))
        except LabelError:
            out.append(None)
    return out
