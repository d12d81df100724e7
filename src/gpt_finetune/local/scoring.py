"""Label-constrained prediction: score each candidate answer as the model was trained to write
it, and pick the most likely, so an answer outside the candidates is impossible.

A candidate is scored exactly as training saw it: the conversation rendered with the model's chat
template and the candidate as the assistant's message, its log-probability summed over the
tokens the training loss covers (the answer and its end-of-turn token, ``chat_data``). The
prompt is shared: it runs once, its KV cache is repeated for the candidates, and all candidates
go through the model in one batched forward pass.

Multi-label data can also be answered label by label (``choose_labels``): any subset of the
labels, each at most once, written in the trained label format, so a combination never seen in
training can be predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .chat_data import IGNORE, fit_messages, tokenize_example


def score_choices(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    choices: list[str],
    max_length: int,
    *,
    fit_to: str | None = None,
    reuse: dict[str, Any] | None = None,
) -> list[float]:
    """Summed log-probability of each choice as the assistant's answer to ``messages``.

    A long prompt is shortened to fit the longest choice (or ``fit_to``, so that several calls
    shorten it alike). ``reuse`` (a dict kept between calls on the same prompt) holds the
    prompt's pass: the next call runs only its candidates."""
    import copy

    import torch

    if not choices:
        raise ValueError("no choices to score")
    longest = fit_to or max(choices, key=len)
    fitted = fit_messages(tokenizer, [*messages, {"role": "assistant", "content": longest}], max_length)
    prompt = fitted[0][:-1] if fitted is not None else messages  # shortened once, the same for every choice
    rows = [tokenize_example(tokenizer, [*prompt, {"role": "assistant", "content": c}]) for c in choices]
    ids = [r["input_ids"] for r in rows if r is not None]
    labels = [r["labels"] for r in rows if r is not None]
    # the shared prefix: up to where the sequences differ, and before the first scored token
    shared = min(len(x) for x in ids)
    for seq in ids[1:]:
        shared = min(shared, next((k for k, (a, b) in enumerate(zip(ids[0], seq, strict=False)) if a != b), shared))
    shared = min(shared, *(lab.index(next(t for t in lab if t != IGNORE)) for lab in labels))
    device = model.device
    n = len(ids)
    with torch.inference_mode():
        kept = reuse.get("ids") if reuse else None
        if kept is not None and len(kept) <= shared and all(seq[: len(kept)] == kept for seq in ids):
            shared = len(kept)  # the prompt ran in an earlier call: start from its cache
            last, arg, cache = reuse["last"], reuse["arg"], copy.deepcopy(reuse["cache"])  # type: ignore[index]
        else:
            # only the prompt's last position predicts a scored token: projecting every position
            # onto the vocabulary would be a fifth of the pass on a long prompt
            head = model(input_ids=torch.tensor([ids[0][:shared]], device=device), use_cache=True, logits_to_keep=1)
            last = head.logits[:, -1:]
            # transformers 5 names the output's KV cache ``cache`` (``past_key_values`` before)
            arg = "cache" if hasattr(head, "cache") else "past_key_values"
            cache = getattr(head, arg)
            if reuse is not None:
                reuse.update(ids=ids[0][:shared], last=last, arg=arg, cache=copy.deepcopy(cache))
        cache.batch_repeat_interleave(n)
        width = max(len(x) for x in ids) - shared
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        tail = torch.full((n, width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((n, shared + width), dtype=torch.long, device=device)
        mask[:, :shared] = 1
        for i, seq in enumerate(ids):
            tail[i, : len(seq) - shared] = torch.tensor(seq[shared:], device=device)
            mask[i, shared : len(seq)] = 1
        out = model(input_ids=tail, attention_mask=mask, use_cache=True, **{arg: cache})
        # logits that predict tail token j: the prompt's last for j = 0, the tail's j - 1 after
        logits = torch.cat([last.expand(n, 1, -1), out.logits[:, :-1]], dim=1).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tail[..., None])[..., 0]
    scores = []
    k = 0
    for r in rows:
        if r is None:  # cannot happen after fit_messages with the longest choice; kept safe
            scores.append(float("-inf"))
            continue
        lab = r["labels"]
        total = sum(float(logp[k, j - shared]) for j in range(shared, len(lab)) if lab[j] != IGNORE)
        scores.append(total)
        k += 1
    return scores


@dataclass(frozen=True)
class LabelAnswer:
    """A label-by-label answer: the labels, the answer's probability and each label's."""

    labels: list[str]
    logprob: float  # of the answer, among the complete answers the search scored
    label_probs: dict[str, float]  # per label: the probability that it belongs in the answer


def choose_labels(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    labels: list[str],
    label_format: str,
    max_length: int,
    thresholds: dict[str, float] | None = None,
) -> LabelAnswer:
    """Label by label: the most likely single-label answer first; then, while adding one more
    label (any not yet chosen, after the ones chosen) gives a more likely complete answer than
    stopping there, the best such label. Every answer compared is complete, in the label format
    and with its end-of-turn token, exactly as training scored it.

    Probabilities are over the complete answers this search scored (every single label, then each
    one-label extension of the answer so far): normalised among them, an answer's probability is
    its share, and a label's is the summed share of the answers that contain it (its marginal,
    restricted to the answers explored; the whole space of subsets is too large to score).
    With ``thresholds`` (label -> probability, tuned on validation data:
    ``data.labels.tune_thresholds``), the answer is instead every label whose probability reaches
    its threshold (``data.labels.apply_thresholds``)."""
    from ..data.labels import apply_thresholds, format_labels

    if not labels:
        raise ValueError("no labels to choose from")
    chosen: list[str] = []
    current = float("-inf")
    scored: dict[tuple[str, ...], float] = {}
    # every round shortens a long prompt alike (for the longest possible answer) and runs it once
    widest = format_labels(list(labels), label_format)
    reuse: dict[str, Any] = {}
    while len(chosen) < len(labels):
        rest = [x for x in labels if x not in chosen]
        candidates = [format_labels([*chosen, x], label_format) for x in rest]
        scores = score_choices(model, tokenizer, messages, candidates, max_length, fit_to=widest, reuse=reuse)
        for x, score in zip(rest, scores, strict=True):
            scored[(*chosen, x)] = score
        best = max(range(len(rest)), key=lambda i: scores[i])
        if chosen and scores[best] <= current:
            break  # stopping here is the more likely answer
        chosen.append(rest[best])
        current = scores[best]
    top = max(scored.values())
    total = sum(math.exp(v - top) for v in scored.values())
    share = {key: math.exp(v - top) / total for key, v in scored.items()}
    probs = {x: sum(p for key, p in share.items() if x in key) for x in labels}
    if thresholds is None:
        return LabelAnswer(chosen, math.log(share[tuple(chosen)]), probs)
    chosen = apply_thresholds(probs, labels, thresholds)
    key = next((k for k in scored if sorted(k) == sorted(chosen)), None)
    if key is None:  # a combination the search did not reach: scored now, beside the others
        key = tuple(chosen)
        answer = [format_labels(chosen, label_format)]
        scored[key] = score_choices(model, tokenizer, messages, answer, max_length, fit_to=widest, reuse=reuse)[0]
    top = max(scored.values())
    log_total = top + math.log(sum(math.exp(v - top) for v in scored.values()))
    return LabelAnswer(chosen, scored[key] - log_total, probs)
