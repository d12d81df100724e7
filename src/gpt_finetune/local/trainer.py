"""Supervised fine-tuning with transformers, TRL and PEFT: the only module that imports them.

``train(spec, hooks)`` runs one job's training: LoRA (default) or full fine-tuning of a causal
LM on chat examples, loss on assistant tokens only (see ``chat_data``), batches grouped by
length so little compute goes to padding, the LM head projecting only the final positions
that hold labels where TRL's would project them all (``label_window_loss``), a checkpoint with
optimizer state every epoch and every ``checkpoint_every_steps`` steps (the last 3 kept),
validation loss at each epoch end, and resumption from a checkpoint. A GPU is used when present (bf16 where supported), the CPU
otherwise. Launched through accelerate, the same code trains data-parallel (DDP); FSDP is
accelerate's config (README, "Several GPUs").
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat_data import IGNORE

DEFAULT_LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@dataclass
class TrainSpec:
    model_dir: str
    training_file: str
    validation_file: str | None
    output_dir: str  # checkpoints go here
    final_dir: str  # the adapter (or full model) is saved here
    n_epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    training_type: str = "lora"  # or "full"
    lora: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LORA))
    max_length: int = 2048
    checkpoint_every_steps: int = 0  # 0: only at each epoch's end
    log_every_steps: int = 0  # 0: about 100 metrics events over the job
    resume_from: str | None = None
    torch_compile: bool = False
    gradient_checkpointing: bool = False
    max_steps: int = 0  # 0: train every epoch (benchmarks cap it)


@dataclass
class Hooks:
    """How the trainer reports; all called on the main process only."""

    on_metrics: Callable[[dict[str, Any]], None] = lambda m: None
    on_checkpoint: Callable[[int, str, dict[str, Any]], None] = lambda step, path, metrics: None
    on_message: Callable[[str], None] = lambda text: None
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class TrainResult:
    stopped: bool
    global_step: int
    trained_tokens: int
    full_valid_loss: float | None
    full_valid_mean_token_accuracy: float | None
    tokens_seen: int = 0  # real (non-padding) tokens trained on, as TRL counts them


def device_kind() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def label_window(labels: Any) -> int:
    """How many final positions of a batch hold every logit that predicts a label.

    The logit at position p predicts the token at p + 1, so a batch whose earliest label sits at
    position f needs the logits from f - 1 on: ``len - f + 1`` positions (at least 1). Answers
    come last in chat examples and batches are grouped by length, so the window is usually short;
    it is correct whatever the padding side or the number of turns, only less of a saving.
    """
    has = labels != IGNORE
    if not bool(has.any()):
        return 1
    first = int(has.float().argmax(dim=1)[has.any(dim=1)].min())
    return labels.shape[1] - max(first - 1, 0)


def label_window_loss(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(summed loss, label count, correct top-1 count) over a batch's labels, projecting through
    the LM head only the window of final positions that holds them (transformers' ``logits_to_keep``)."""
    import torch

    labels = inputs["labels"]
    keep = label_window(labels)
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward, logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
    target = labels[:, labels.shape[1] - keep + 1 :].to(logits.device)
    mask = target != IGNORE
    if not bool(mask.any()):  # nothing to learn here: a differentiable zero keeps backward() working
        zero = logits.sum() * 0.0
        return zero, mask.sum(), mask.sum()
    picked = logits[mask]
    loss = torch.nn.functional.cross_entropy(picked, target[mask], reduction="sum")
    correct = (picked.detach().argmax(dim=-1) == target[mask]).sum()
    return loss, mask.sum(), correct


@functools.cache
def _scores_every_position(device_type: str) -> bool:
    """Whether TRL's fused LM head would project every position on this device.

    TRL 1.x projects only the labelled positions with its Triton kernels (CUDA, XPU) and every
    position elsewhere, so that its tile shapes stay fixed. On a CPU that projection through the
    49k-token vocabulary is about a third of a training step, for assistant tokens that are a few
    percent of the positions; there we project only the window that holds the labels instead.
    """
    import importlib.util

    return not (device_type in ("cuda", "xpu") and importlib.util.find_spec("triton") is not None)


def _trainer_class() -> Any:
    from trl import SFTTrainer

    class Trainer(SFTTrainer):  # type: ignore[misc]
        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if not _scores_every_position(self.args.device.type):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from transformers.modeling_outputs import CausalLMOutput

            # The same loss and metrics as TRL's compute_loss (its nll loss_type), from fewer logits.
            mode = "train" if model.training else "eval"
            total, count, correct = label_window_loss(model, inputs)
            loss = total / (count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            n = self.accelerator.gather_for_metrics(count.detach()).sum()
            hits = self.accelerator.gather_for_metrics(correct.detach()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((hits / n).item() if n > 0 else 0.0)
            if mode == "train":
                real = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += real // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss

    return Trainer


def train(spec: TrainSpec, hooks: Hooks, extra_callbacks: list[Any] | None = None) -> TrainResult:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig

    from .chat_data import tokenize_file

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = tokenize_file(tokenizer, spec.training_file, spec.max_length)
    valid_rows = tokenize_file(tokenizer, spec.validation_file, spec.max_length) if spec.validation_file else None
    train_ds = Dataset.from_list(train_rows)
    valid_ds = Dataset.from_list(valid_rows) if valid_rows else None
    n_assistant = sum(sum(1 for x in r["labels"] if x != IGNORE) for r in train_rows)
    n_tokens = sum(len(r["input_ids"]) for r in train_rows)

    kind = device_kind()
    bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=dtype)
    model.config.use_cache = False
    peft_config = None
    if spec.training_type == "lora":
        from peft import LoraConfig

        lora = {**DEFAULT_LORA, **spec.lora}
        peft_config = LoraConfig(
            r=int(lora["r"]),
            lora_alpha=int(lora["alpha"]),
            lora_dropout=float(lora["dropout"]),
            target_modules=list(lora["target_modules"]),
            task_type="CAUSAL_LM",
        )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = max(1, spec.batch_size // world)
    steps_per_epoch = math.ceil(len(train_rows) / (per_device * world))
    total_steps = steps_per_epoch * spec.n_epochs
    log_every = spec.log_every_steps or max(1, total_steps // 100)
    hooks.on_message(
        f"Training {len(train_rows)} examples ({n_tokens:,} tokens, {n_assistant:,} trained) for {spec.n_epochs} "
        f"epochs, batch {spec.batch_size}, {total_steps} steps, on {kind}"
        + (f" x{world}" if world > 1 else "")
        + f" ({spec.training_type})"
    )
    args = SFTConfig(
        output_dir=spec.output_dir,
        num_train_epochs=spec.n_epochs,
        max_steps=spec.max_steps or -1,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        seed=spec.seed,
        data_seed=spec.seed,
        logging_steps=log_every,
        logging_first_step=True,
        eval_strategy="epoch" if valid_ds is not None else "no",
        save_strategy="steps" if spec.checkpoint_every_steps else "epoch",
        save_steps=spec.checkpoint_every_steps or 500,
        save_total_limit=3,
        report_to="none",
        bf16=bf16,
        use_cpu=kind == "cpu",
        ddp_backend="gloo" if kind == "cpu" and world > 1 else None,
        train_sampling_strategy="group_by_length",  # similar lengths together: little padding
        max_length=spec.max_length,
        dataloader_num_workers=0,
        disable_tqdm=True,
        torch_compile=spec.torch_compile,
        remove_unused_columns=True,
        # TRL turns activation checkpointing on by default. Off, the default model trains 1.32x
        # faster on CPU and peaks at 4.3 GB instead of 2.1 (bench/README.md); opt in with
        # gradient_checkpointing where memory is short or the model is big.
        gradient_checkpointing=spec.gradient_checkpointing,
    )

    class Bridge(TrainerCallback):
        """Trainer events to job events, checkpoints, and cancellation."""

        last: dict[str, Any] = {}
        stopped = False

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
            if len(metrics) > 2:
                self.last.update(metrics)
                hooks.on_metrics(metrics)

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            control.should_save = True  # one checkpoint per epoch, whatever save_steps says

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                hooks.on_checkpoint(state.global_step, path, dict(self.last))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if hooks.should_stop():
                self.stopped = True
                control.should_training_stop = True
                control.should_save = False

    bridge = Bridge()
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[bridge, *(extra_callbacks or [])],
    )
    if spec.resume_from:
        hooks.on_message(f"Resuming from checkpoint {Path(spec.resume_from).name}")
    trainer.train(resume_from_checkpoint=spec.resume_from)
    full_loss = full_acc = None
    if not bridge.stopped:
        if valid_ds is not None:
            final = trainer.evaluate()
            full_loss = float(final["eval_loss"])
            full_acc = float(final["eval_mean_token_accuracy"]) if "eval_mean_token_accuracy" in final else None
        if trainer.is_world_process_zero():
            trained: Any = trainer.model
            trained.save_pretrained(spec.final_dir)
            tokenizer.save_pretrained(spec.final_dir)
    seen = int(getattr(trainer, "_total_train_tokens", 0))
    return TrainResult(bridge.stopped, trainer.state.global_step, n_tokens * spec.n_epochs, full_loss, full_acc, seen)
