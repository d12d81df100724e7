"""The memory plan: how many tokens go into one micro-batch, so that training fits, whatever the data.

What grows with the data is not the data set but the tokens of one forward/backward pass: every
layer keeps its activations for the backward pass (about 0.84 MB a token for SmolLM2-135M in
float32 with the default LoRA and the fused layers of ``fused``; 1.4 MB with stock PEFT layers),
and every labelled position needs a full-vocabulary row of logits and its gradient (about 0.8 MB).
So each optimizer step (OpenAI's ``batch_size`` examples) is split into packed micro-batches whose
estimated cost fits a byte budget, with gradient accumulation summing them into exactly the
unsplit step's gradient (``trainer``). The budget is what is left of the memory target once the
model, its optimizer state and the runtime are counted:

    target  = min(memory_limit_gb (default 4 GB), 85 % of what the machine has available)
    budget  = 90 % of target - static
    cost(micro-batch) = per_token x tokens + per_label x labelled tokens

``per_token`` is measured when a job starts: the bytes autograd saves for one short forward pass
of the job's own model (its LoRA targets, fused layers and dtype), per token
(``saved_bytes_per_token``), times the allocator slack measured against real peaks
(``MEASURED_SLACK``; bench/README.md). Without a model at hand it is estimated from the shape.

Activation checkpointing (keep only each layer's input, recompute the rest in the backward pass:
about 1.3x the compute, a tenth of the memory per token) is turned on only for the micro-batches
that need it: examples that fit the budget without it are packed together and run at full speed,
and an example too long for that trains alone, checkpointed. A job that does not fit even then
fails before training, with the numbers. The allocator a training process runs on is the worker's
business (``worker.allocator``: tcmalloc preloaded where installed, else glibc told to return
large freed blocks); ``MEASURED_SLACK`` was measured on glibc, and tcmalloc's peaks are a few per
cent lower, so there the plan errs on the safe side.

On a CUDA device the same plan is made against the device's free memory instead of the
process's resident memory; the 4 GB default applies to the CPU.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import GptFinetuneError
from .chat_data import IGNORE
from .machine import available_bytes, resident_bytes

GB = 1_000_000_000
DEFAULT_MEMORY_LIMIT_GB = 4.0
HEADROOM = 0.9  # of the target, for what the estimate does not see (allocator slack, evaluation)
LOGIT_COPIES = 4  # logits, their log-softmax, and the gradients of both, per labelled position
# what the saved tensors leave out: the backward pass's transient gradients and the heap's freed
# blocks under the mmap threshold (a packed row's per-example attention tensors). Measured with
# fused LoRA dropout and SwiGLU, 2,500-token micro-batches of real issues: 1.41 (bench/README.md)
MEASURED_SLACK = 1.45
ALLOCATOR_SLACK = 1.2  # resident memory beyond the live tensors, measured with limit_heap_growth's setting


class MemoryPlanError(GptFinetuneError):
    code = "insufficient_memory"


@dataclass
class MemoryPlan:
    target_bytes: int
    target_source: str
    static_bytes: int
    per_token_bytes: int  # activations kept per token without checkpointing
    per_token_checkpointed_bytes: int  # ... and with it
    per_label_bytes: int
    budget_bytes: int
    checkpointing: str  # "off"; "on" (every micro-batch); "auto" (only examples too long without it)
    largest_example_tokens: int
    max_micro_batches: int  # per optimizer step and process, for the longest batch_size examples
    estimated_peak_bytes: int
    tokens_only: bool = False  # micro_batch_tokens was given: micro-batches hold at most that many tokens

    @property
    def micro_batch_tokens(self) -> int:
        """The budget in tokens of an unlabelled micro-batch."""
        per = self.per_token_checkpointed_bytes if self.checkpointing == "on" else self.per_token_bytes
        return max(self.budget_bytes // per, 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryPlan:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def describe(self) -> str:
        gc = {
            "off": "off",
            "on": "on",
            "auto": f"only for examples over {self.budget_bytes // self.per_token_bytes:,} tokens",
        }[self.checkpointing]
        return (
            f"Memory plan: micro-batches of up to {self.micro_batch_tokens:,} tokens, "
            f"up to {self.max_micro_batches} per step (gradient accumulation), activation checkpointing "
            f"{gc}, estimated peak {self.estimated_peak_bytes / GB:.2f} GB "
            f"of {self.target_bytes / GB:.2f} GB ({self.target_source})"
        )

    def cost(self, tokens: int, labels: int, checkpointed: bool = False) -> int:
        per = self.per_token_checkpointed_bytes if checkpointed else self.per_token_bytes
        return per * tokens + self.per_label_bytes * labels

    def micro_batches(self, examples: list[tuple[int, int]]) -> list[tuple[list[int], bool]]:
        """One step's examples (tokens, labelled tokens) grouped into micro-batches within the
        budget: (indices, checkpointed). With ``auto``, examples that fit without checkpointing
        are packed together, and each longer one trains alone with it."""
        from .packing import split_by_budget

        gc_all = self.checkpointing == "on"
        costs = [self.cost(t, 0 if self.tokens_only else n, gc_all) for t, n in examples]
        if self.checkpointing != "auto":
            return [(g, gc_all) for g in split_by_budget(costs, self.budget_bytes)]
        small = [i for i, c in enumerate(costs) if c <= self.budget_bytes]
        big = [i for i, c in enumerate(costs) if c > self.budget_bytes]
        groups = [([small[k] for k in g], False) for g in split_by_budget([costs[i] for i in small], self.budget_bytes)]
        return groups + [([i], True) for i in big]


def activation_bytes_per_token(config: Any, checkpointing: bool, dtype_bytes: int, measured: int | None = None) -> int:
    """Bytes a token costs in a training step, activations and allocator slack: from ``measured``
    (what autograd saves per token without checkpointing, ``saved_bytes_per_token``), or else
    estimated from the model's shape.

    The estimate is that of stock PEFT and transformers layers: each decoder layer keeps about 10
    hidden-size vectors (norms, the attention projections' inputs and outputs, LoRA's dropped-out
    inputs and masks) and 4 intermediate-size ones (the MLP's gate, up, activation and product)
    per token. With checkpointing, each layer keeps its input, and one layer at a time is rebuilt
    in full (counted twice: its activations and their gradients).
    """
    h = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * h) or 4 * h)
    layers = int(config.num_hidden_layers)
    per_layer = (measured / dtype_bytes / layers) if measured else 10 * h + 4 * inter
    floats = layers * h + 2 * per_layer if checkpointing else layers * per_layer
    return int(floats * dtype_bytes * (MEASURED_SLACK if measured else ALLOCATOR_SLACK))


def saved_bytes_per_token(model: Any, device: Any = None, lengths: tuple[int, int] = (64, 192)) -> int:
    """Bytes autograd keeps for the backward pass per token of a packed training micro-batch,
    measured on this very model (its LoRA targets, fused layers, dtype, attention): the tensors
    saved by one forward pass of ``lengths[1]`` tokens minus those of ``lengths[0]``, divided
    by the difference (weights and what does not grow with the tokens cancel out). No backward
    pass runs, and the random number generators are left as they were."""
    import torch

    from .packing import pack, packed_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(tokens: int) -> int:
        seen: dict[int, int] = {}

        def keep(t: Any) -> Any:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        micro = pack([{"input_ids": [0] * tokens, "labels": [IGNORE] * (tokens - 1) + [0]}])
        micro = {k: v.to(device) if device is not None else v for k, v in micro.items()}
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss, _, _ = packed_loss(model, micro)
        del loss
        return sum(seen.values())

    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device is not None and str(device).startswith("cuda") else []):
            low, high = saved(lengths[0]), saved(lengths[1])
    finally:
        model.train(was_training)
    return max((high - low) // (lengths[1] - lengths[0]), 1)


def make_plan(
    *,
    config: Any,
    dtype_bytes: int,
    static_bytes: int,
    examples: list[tuple[int, int]],
    batch_size: int,
    checkpointing: bool | None,
    memory_limit_gb: float | None,
    micro_batch_tokens: int | None,
    device_free_bytes: int | None = None,
    seed: int = 0,
    saved_bytes_per_token: int | None = None,
) -> MemoryPlan:
    """Plan a job's micro-batches. ``examples`` are (tokens, labelled tokens) per example; ``static``
    is what the process holds before the first step (runtime, weights, optimizer state).
    ``checkpointing`` None means decide; ``micro_batch_tokens`` overrides the budget.
    ``saved_bytes_per_token``, measured on the model (``saved_bytes_per_token()``), replaces the
    estimate from the model's shape."""
    if device_free_bytes is not None:
        target, source = device_free_bytes, "free device memory"
        if memory_limit_gb:
            target, source = min(target, int(memory_limit_gb * GB)), f"memory_limit_gb = {memory_limit_gb:g}"
    else:
        target = int((memory_limit_gb or DEFAULT_MEMORY_LIMIT_GB) * GB)
        source = f"memory_limit_gb = {memory_limit_gb:g}" if memory_limit_gb else "the default limit"
        free = available_bytes()
        if free is not None:
            usable = int(0.85 * (free + resident_bytes()))
            if usable < target:
                target, source = usable, "85 % of the memory this machine has available"
    per_label = int(getattr(config, "vocab_size", 0) or 0) * 4 * LOGIT_COPIES
    per_token = activation_bytes_per_token(config, False, dtype_bytes, saved_bytes_per_token)
    per_token_gc = activation_bytes_per_token(config, True, dtype_bytes, saved_bytes_per_token)
    budget = int(HEADROOM * target) - static_bytes
    longest = max(examples, key=lambda e: (e[0], e[1]))

    def build(mode: str) -> MemoryPlan:
        plan = MemoryPlan(
            target_bytes=target,
            target_source=source,
            static_bytes=static_bytes,
            per_token_bytes=per_token,
            per_token_checkpointed_bytes=per_token_gc,
            per_label_bytes=per_label,
            budget_bytes=max(budget, 0),
            checkpointing=mode,
            largest_example_tokens=longest[0],
            max_micro_batches=0,
            estimated_peak_bytes=0,
        )
        if micro_batch_tokens:
            plan.budget_bytes = micro_batch_tokens * (per_token_gc if mode == "on" else per_token)
            plan.tokens_only = True
        # the peak comes from the fullest micro-batch: simulate an epoch of steps to find it
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        steps = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        steps.append(sorted(order, key=lambda i: examples[i], reverse=True)[:batch_size])  # the longest together
        biggest = 0
        for step in steps:
            groups = plan.micro_batches([examples[i] for i in step])
            plan.max_micro_batches = max(plan.max_micro_batches, len(groups))
            for g, gc in groups:
                biggest = max(biggest, sum(plan.cost(*examples[step[i]], gc) for i in g))
        plan.estimated_peak_bytes = static_bytes + biggest
        return plan

    mode = {None: "auto", True: "on", False: "off"}[checkpointing]
    plan = build(mode)
    fits = plan.estimated_peak_bytes - static_bytes <= plan.budget_bytes
    if not fits and not micro_batch_tokens:
        need = static_bytes + plan.cost(*longest, mode != "off")
        raise MemoryPlanError(
            f"not enough memory to train: the longest example ({longest[0]:,} tokens, {longest[1]:,} of them "
            f"labelled) needs about {need / GB:.2f} GB with activation checkpointing "
            f"{'off' if mode == 'off' else 'on'}, and {plan.target_source} allows {target / GB:.2f} GB "
            f"({static_bytes / GB:.2f} GB of it for the model and runtime)",
            hint="lower max_length, raise memory_limit_gb if the machine has the memory"
            + (", or leave gradient_checkpointing unset" if mode == "off" else ""),
        )
    if mode == "auto" and not any(gc for _, gc in plan.micro_batches([longest])):
        plan.checkpointing = "off"  # no example needs it
    return plan
