"""The trainer's hooks into TRL: an ``SFTTrainer`` whose steps are packed micro-batches, and a
callback that turns the Trainer's events into a job's events.

Imported only when a job trains (it loads TRL and transformers). Extension points used:
``training_step`` and ``prediction_step`` (the Trainer's documented overrides), ``TrainerCallback``
for logging, checkpoints and stopping, ``accelerator.no_sync`` and ``accelerator.backward``.
Where TRL has no public way, its own accumulators are written from inside the subclass, as its
``compute_loss`` does: ``_metrics`` (what ``log`` reports as ``mean_token_accuracy`` and
``num_tokens``; there is no public hook to add a metric to TRL's logs) and the token count
behind ``num_tokens`` (``_total_train_tokens``; TRL counts it in ``compute_loss``, which packed
micro-batches do not go through).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from trl import SFTTrainer

from .chat_data import IGNORE
from .packing import pack, packed_loss


def set_checkpointing(model: Any, on: bool) -> None:
    """Turn activation checkpointing on or off for the next forward pass (its function is set
    once by ``enable_checkpointing``)."""
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = on


def enable_checkpointing(model: Any) -> None:
    """Give the model's layers their checkpointing function (non-reentrant). transformers 5.24
    renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name
    warns and goes in v6); older releases have only the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _empty_micro() -> dict[str, Any]:
    """A one-token micro-batch with no labels: what a process with fewer micro-batches than the
    others runs, so that every process makes the same number of forward passes (FSDP gathers
    parameters in each)."""
    return pack([{"input_ids": [0], "labels": [IGNORE]}])


class PackedSFTTrainer(SFTTrainer):  # type: ignore[misc]
    """Each step's examples arrive as packed micro-batches (``StepCollator``); the loss of each is
    its labels' summed cross-entropy over the labels of the whole step on all processes, so the
    accumulated gradient is exactly the unsplit step's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_per_micro_batch = False  # set by ``use_plan``
        self.real_tokens = 0  # non-padding tokens trained on, all processes

    def use_plan(self, plan: Any) -> None:
        """Train by this memory plan: its micro-batches, and checkpointing only where it says."""
        self.data_collator.plan = plan
        self.checkpoint_per_micro_batch = plan.checkpointing != "off"
        if self.checkpoint_per_micro_batch:  # set up once; each micro-batch then says whether it is used
            enable_checkpointing(self.model)
            set_checkpointing(self.model, False)

    def _reduce(self, values: list[int], reduction: str) -> list[int]:
        """Element-wise sum or max over processes: one small collective."""
        if self.accelerator.num_processes == 1:
            return values
        t = torch.tensor(values, device=self.args.device)
        if reduction == "max":
            return [-int(x) for x in self.accelerator.reduce(-t, reduction="min")]  # no "max" in accelerate
        return [int(x) for x in self.accelerator.reduce(t, reduction="sum")]

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        model.train()
        micro = list(inputs["micro"])
        (n_global,) = self._reduce([sum(int(m["label_target"].numel()) for m in micro)], "sum")
        (n_micro,) = self._reduce([len(micro)], "max")
        micro += [_empty_micro() for _ in range(n_micro - len(micro))]
        world = self.accelerator.num_processes
        total = torch.zeros((), device=self.args.device)
        hits = count = 0
        for k, mb in enumerate(micro):
            if self.checkpoint_per_micro_batch:
                set_checkpointing(model, bool(mb.get("checkpointed")))
            mb = self._prepare_inputs(mb)
            sync = k == len(micro) - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
            with ctx, self.compute_loss_context_manager():
                loss, n, correct = packed_loss(model, mb)
                # DDP averages gradients over processes: scale so the step's gradient is the
                # mean over every label of the step, whatever the split
                scaled = loss * (world / max(n_global, 1))
                self.accelerator.backward(scaled)
            total += scaled.detach()
            hits += int(correct)
            count += int(n)
            del loss, scaled
        real = sum(int(m["input_ids"].numel()) for m in inputs["micro"])
        real, hits, count = self._reduce([real, hits, count], "sum")
        self.real_tokens += real
        self._total_train_tokens = self.real_tokens
        self._metrics["train"]["mean_token_accuracy"].append(hits / count if count else 0.0)
        self._metrics["train"]["num_tokens"] = [self.real_tokens]
        return total

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[Any, None, None]:
        total = torch.zeros((), device=self.args.device)
        hits = count = 0
        with torch.no_grad():
            for mb in inputs["micro"]:
                loss, n, correct = packed_loss(model, self._prepare_inputs(mb))
                total += loss
                hits += int(correct)
                count += int(n)
        self._metrics["eval"]["mean_token_accuracy"].append(hits / count if count else 0.0)
        return total / max(count, 1), None, None


class JobCallback(TrainerCallback):  # type: ignore[misc]
    """Trainer events to the job's hooks: metrics, checkpoints, and stopping (cancel or pause)."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks
        self.last: dict[str, Any] = {}
        self.stopped = False
        self.saved_step = -1  # the step of the latest checkpoint
        self.evaluated: tuple[int, dict[str, Any]] | None = None  # (step, metrics) of the latest evaluation

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self.evaluated = (state.global_step, dict(metrics))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        metrics: dict[str, Any] = {"step": state.global_step, "total_steps": state.max_steps}
        if "loss" in logs:
            metrics["train_loss"] = float(logs["loss"])
            if "mean_token_accuracy" in logs:
                metrics["train_mean_token_accuracy"] = float(logs["mean_token_accuracy"])
        if "eval_loss" in logs:
            metrics["valid_loss"] = float(logs["eval_loss"])
            if "eval_mean_token_accuracy" in logs:
                metrics["valid_mean_token_accuracy"] = float(logs["eval_mean_token_accuracy"])
        for key, value in logs.items():  # a DPO job's figures, by TRL's names (``dpo.METRICS``)
            if key.startswith("rewards/"):
                metrics[key] = float(value)
            elif key.startswith("eval_rewards/"):
                metrics["valid_" + key[len("eval_") :]] = float(value)
        if len(metrics) > 2:
            self.last.update(metrics)
            self.hooks.on_metrics(metrics)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # one checkpoint per epoch, whatever save_steps says; but not a second one of the step
        # a pause just saved (the Trainer ends the epoch it stops in)
        control.should_save = state.global_step != self.saved_step

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.saved_step = state.global_step
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.hooks.on_checkpoint(state.global_step, path, dict(self.last))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.hooks.should_stop():
            self.stopped = True
            control.should_training_stop = True
            control.should_save = self.hooks.save_on_stop()
