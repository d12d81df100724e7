"""Padding-free micro-batches: several examples packed into one row, attention kept inside each.

A micro-batch is one row of token ids holding whole examples back to back, with position ids that
restart at 0 for each example. Attention must never cross from one example into the next:

- with flash-attention kernels (CUDA, ``flash_attn`` installed) transformers' own
  ``flash_attention_2`` reads the example boundaries from the position ids (varlen kernels);
- elsewhere (CPU, MPS, CUDA without flash-attn) ``packed_sdpa`` below runs PyTorch's
  scaled-dot-product attention once per example with ``is_causal=True``. transformers could
  instead build a block-diagonal mask over the whole row for SDPA, but a masked SDPA computes
  every (query, key) pair of the row and keeps the mask (row length squared) alive through the
  backward pass: four examples of 700 tokens in a row cost four times the attention compute of
  the examples alone. Per-example calls cost exactly the examples' own attention and need no mask.

The LM head projects only the positions whose next token is a label (``logits_to_keep`` given
the indices), since in a packed row they are spread through it; a 49k-token vocabulary times
every position is most of a step's memory otherwise.
"""

from __future__ import annotations

from typing import Any

from .chat_data import IGNORE

PACKED_SDPA = "gptft_packed_sdpa"
_registered = False


def example_bounds(position_ids: Any) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row of one batch row, from its position ids."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], int(position_ids.shape[-1])]
    return list(zip(starts, ends))


def packed_sdpa(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None, **kwargs: Any
) -> tuple[Any, None]:
    """SDPA per example of a packed row (query: batch 1 x heads x tokens x dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        # not a packed training row (generation with a cache, a padded batch): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)  # type: ignore[no-any-return]
    bounds = example_bounds(position_ids)
    if len(bounds) == 1:
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True)  # type: ignore[no-any-return]
    parts = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, scaling=scaling, is_causal=True
        )[0]
        for a, b in bounds
    ]
    return torch.cat(parts, dim=1), None  # (batch, tokens, heads, dim), as transformers expects


def use_packed_attention(model: Any, name: str = PACKED_SDPA) -> str:
    """Switch a loaded model to attention that keeps packed examples apart (``device.attention``
    chooses which); returns its name."""
    global _registered

    config = model.config
    # flash_attention_2 (the other choice) is transformers' own: its varlen kernels read the
    # boundaries from the position ids
    if name == PACKED_SDPA and not _registered:
        from transformers import AttentionInterface

        # registered for attention only, not in transformers' mask interface: models then
        # build no mask at all for it, which is what a per-example causal call wants
        AttentionInterface.register(PACKED_SDPA, packed_sdpa)
        _registered = True
    model.set_attn_implementation(name) if hasattr(model, "set_attn_implementation") else None
    config._attn_implementation = name
    return name


def pack(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Examples (``input_ids``, ``labels``) to one packed micro-batch.

    ``label_index`` holds the positions whose logits predict a label (the position before each
    labelled token) and ``label_target`` those labels, in order.
    """
    import torch

    ids: list[int] = []
    positions: list[int] = []
    index: list[int] = []
    target: list[int] = []
    for row in rows:
        offset = len(ids)
        ids.extend(row["input_ids"])
        positions.extend(range(len(row["input_ids"])))
        labels = row["labels"]
        for k in range(1, len(labels)):
            if labels[k] != IGNORE:
                index.append(offset + k - 1)
                target.append(labels[k])
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "label_index": torch.tensor(index, dtype=torch.long),
        "label_target": torch.tensor(target, dtype=torch.long),
    }


def packed_loss(model: Any, micro: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(summed cross-entropy, label count, correct top-1 count) of one packed micro-batch."""
    import torch

    index, target = micro["label_index"], micro["label_target"]
    if index.numel() == 0:  # nothing to learn here: a differentiable zero keeps backward() working
        out = model(input_ids=micro["input_ids"], position_ids=micro["position_ids"], logits_to_keep=1, use_cache=False)
        zero = out.logits.sum() * 0.0
        return zero, torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    out = model(input_ids=micro["input_ids"], position_ids=micro["position_ids"], logits_to_keep=index, use_cache=False)
    logits = out.logits[0].float()
    target = target.to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    correct = (logits.detach().argmax(dim=-1) == target).sum()
    return loss, torch.tensor(target.numel()), correct


def split_by_budget(costs: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into as few micro-batches as first-fit decreasing finds, each within
    ``budget`` (an item larger than the budget gets a micro-batch of its own). Deterministic."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if costs[i] <= free:
                bins[b].append(i)
                room[b] -= costs[i]
                break
        else:
            bins.append([i])
            room.append(budget - costs[i])
    return [sorted(b) for b in bins]
