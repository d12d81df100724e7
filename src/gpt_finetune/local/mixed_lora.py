"""Rows of one decoding step on different LoRA adapters of one base, in two dense matmuls a layer.

PEFT's mixed batches (``adapter_names=[...]``) loop over the adapters in every adapted layer:
gather the rows of each, run its A and B on them, scatter the result back. Measured on the
default model (bench/README.md, "Many clients at once"), a 16-row step over five models cost
twice the base model's step (363 ms against 182 ms), where one adapter for every row costs a
fifth more (219 ms): the gathers, scatters and Python loops, not the arithmetic, are the price.

Here each adapted layer keeps, for the adapters a step uses, their A matrices stacked
(``A_cat``: the sum of their ranks x in) and their B matrices side by side with each one's
scaling folded in (``B_cat``: out x the sum of ranks). A step's rows then cost two matmuls,
``(x @ A_cat.T * mask) @ B_cat.T``, where ``mask`` keeps for each row the columns of its own
adapter (none for a row on the base model): every row computes every adapter's rank-r middle,
a few dozen columns, and drops the others' before B. No gather, no scatter, no loop, and the
result is PEFT's up to float rounding (the per-row sums are the same products, added in the
same order per adapter).

Used only for plain LoRA on ``nn.Linear`` layers in eval mode (no DoRA or other variants, no
LoRA bias, not merged); ``supported`` says when, and anything else keeps PEFT's own path.
Prompt chunks never mix adapters (``Engine._forward`` runs them on PEFT's single-adapter path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# stacked matrices kept per layer, one per combination of adapters a step used: a copy of those
# adapters' weights each (about 140 MB for five rank-16 adapters of every linear layer of the
# default model), so two (a busy server's batches hold the same few models step after step)
_CACHE = 2


class _Step:
    """The rows of the step in progress: each row's index into ``names`` (-1: the base model)."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.rows: torch.Tensor | None = None
        self.patched: tuple[str, ...] | None = None  # the model's adapters when its layers were patched


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def supported(model: Any) -> bool:
    """Whether every adapted layer is plain LoRA on a linear layer, unmerged (looked at once per
    set of attached adapters)."""
    attached = tuple(getattr(model, "peft_config", {}))
    known = model.__dict__.get("_gptft_supported")
    if known is not None and known[0] == attached:
        return bool(known[1])
    answer = _supported(model)
    model.__dict__["_gptft_supported"] = (attached, answer)
    return answer


def _supported(model: Any) -> bool:
    from peft.tuners.lora.layer import Linear

    adapted = [m for m in model.modules() if len(getattr(m, "lora_A", ())) > 0]
    return bool(adapted) and all(
        isinstance(m, Linear)
        and not m.merged
        and not getattr(m, "lora_variant", None)  # DoRA and the other variants
        and not any(getattr(m, "lora_bias", {}).values())
        for m in adapted
    )


def _stacked(layer: Any, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(A_cat, B_cat with the scalings folded in, the owner of each rank column) of this layer
    for ``names`` (the adapters this layer has, in the step's order), cached by the names and
    checked against the weights themselves (an adapter loaded again under its name has new
    ones; the entry holds the ones it was made from, so none is mistaken for another)."""
    present = [(i, n) for i, n in enumerate(names) if n in layer.lora_A]
    if not present:
        return None
    weights = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for _, n in present]
    cache = layer.__dict__.setdefault("_gptft_stacked", {})
    hit = cache.get(names)
    if hit is not None and all(a is a0 and b is b0 for (a, b), (a0, b0) in zip(weights, hit[0])):
        return hit[1]
    a = torch.cat([w for w, _ in weights], dim=0).detach()
    b = torch.cat([w * layer.scaling[n] for (_, w), (_, n) in zip(weights, present)], dim=1).detach()
    owners = torch.cat([torch.full((w.shape[0],), i, dtype=torch.long) for (w, _), (i, _) in zip(weights, present)])
    cache.pop(names, None)
    while len(cache) >= _CACHE:
        cache.pop(next(iter(cache)))
    cache[names] = (weights, (a, b, owners.to(a.device)))
    return cache[names][1]


def forget(model: Any) -> None:
    """Drop every layer's stacked matrices (an adapter was unloaded: its copies go with it)."""
    for layer in _lora_layers(model):
        layer.__dict__.pop("_gptft_stacked", None)


def _forward(layer: Any, step: _Step, original: Any) -> Any:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = step.rows
        if rows is None or kwargs.get("adapter_names") is not None or x.dim() != 3 or x.shape[0] != rows.shape[0]:
            return original(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)
        stacked = _stacked(layer, step.names)
        if stacked is None:  # none of the step's adapters adapts this layer
            return result
        a, b, owners = stacked
        mask = (owners[None, :] == rows[:, None]).to(a.dtype)  # rows x rank columns: its own adapter's
        middle = (x.to(a.dtype) @ a.T) * mask[:, None, :]
        return result + (middle @ b.T).to(result.dtype)

    return forward


def _state(model: Any) -> _Step:
    """The model's step holder, its LoRA layers' forwards replaced once (again for layers an
    adapter loaded later added: each layer is checked for the replacement)."""
    step = model.__dict__.get("_gptft_step")
    if step is None:
        step = model.__dict__["_gptft_step"] = _Step()
    attached = tuple(getattr(model, "peft_config", {}))
    if step.patched == attached:
        return step
    step.patched = attached
    for layer in _lora_layers(model):
        if layer.__dict__.get("_gptft_step") is not step:
            original = layer.__dict__.get("_gptft_original") or layer.forward
            layer.__dict__["_gptft_original"] = original
            layer.__dict__["_gptft_step"] = step
            layer.forward = _forward(layer, step, original)
    return step


@contextlib.contextmanager
def mixed_rows(model: Any, adapters: list[str | None]) -> Iterator[None]:
    """Within it, the model's forward runs each row on its adapter (None: the base model)."""
    step = _state(model)
    names = tuple(dict.fromkeys(a for a in adapters if a is not None))
    index = {n: i for i, n in enumerate(names)}
    device = next(model.parameters()).device
    step.names = names
    step.rows = torch.tensor([index[a] if a is not None else -1 for a in adapters], device=device)
    try:
        yield
    finally:
        step.rows = None
