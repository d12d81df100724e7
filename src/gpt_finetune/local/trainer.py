"""Supervised fine-tuning with transformers, TRL and PEFT: with ``fused``, the only modules that import them.

``train(spec, hooks)`` runs one job's training: LoRA (default) or full fine-tuning of a causal
LM on chat examples, loss on assistant tokens only (see ``chat_data``; a long prompt is shortened
in its middle so the answer is never cut), a checkpoint with optimizer state every epoch and every
``checkpoint_every_steps`` steps (the last 3 kept), validation loss at each epoch end, and
resumption from a checkpoint. A GPU is used when present (bf16 where supported), the CPU
otherwise. Launched through accelerate, the same code trains data-parallel (DDP); FSDP is
accelerate's config (README, "Several GPUs").

Each optimizer step takes ``batch_size`` examples, as OpenAI defines it, and splits them into
packed, padding-free micro-batches that fit the job's memory plan (``memory``, ``packing``); the
loss of each micro-batch is its labels' summed cross-entropy divided by the labels of the whole
step (all processes), so the accumulated gradient is exactly that of the unsplit step. The
model's LoRA layers and SwiGLU MLPs run ``fused``'s functions in training (less kept for the
backward pass, a cheaper dropout mask), and the plan's per-token cost is measured on the model
so built (``memory.saved_bytes_per_token``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import DEFAULT_MAX_LENGTH
from .chat_data import IGNORE, TRAINING_SHAPE

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
    max_length: int = DEFAULT_MAX_LENGTH  # a longer example's prompt is shortened to fit (chat_data.fit_messages)
    checkpoint_every_steps: int = 0  # 0: only at each epoch's end
    log_every_steps: int = 0  # 0: about 100 metrics events over the job
    resume_from: str | None = None
    torch_compile: bool = False
    gradient_checkpointing: bool | None = None  # None: on when the memory plan needs it
    max_steps: int = 0  # 0: train every epoch (benchmarks cap it)
    memory_limit_gb: float | None = None  # None: memory.DEFAULT_MEMORY_LIMIT_GB, lowered to what is free
    micro_batch_tokens: int | None = None  # overrides the plan's token budget per micro-batch
    plan: dict[str, Any] | None = None  # a stored plan (a resumed job): reused, not made anew


@dataclass
class Hooks:
    """How the trainer reports; all called on the main process only."""

    on_metrics: Callable[[dict[str, Any]], None] = lambda m: None
    on_checkpoint: Callable[[int, str, dict[str, Any]], None] = lambda step, path, metrics: None
    on_message: Callable[[str], None] = lambda text: None
    should_stop: Callable[[], bool] = lambda: False
    save_on_stop: Callable[[], bool] = lambda: False  # a paused job keeps a checkpoint of where it stopped
    on_plan: Callable[[dict[str, Any]], None] = lambda plan: None  # store it with the job


@dataclass
class TrainResult:
    stopped: bool
    global_step: int
    trained_tokens: int
    full_valid_loss: float | None
    full_valid_mean_token_accuracy: float | None
    tokens_seen: int = 0  # real (non-padding) tokens trained on, as TRL counts them
    plan: dict[str, Any] | None = None
    n_truncated: int = 0


def _labelled(row: dict[str, Any]) -> int:
    """How many of an example's tokens are trained on (its labels that are not IGNORE)."""
    return sum(1 for x in row["labels"] if x != IGNORE)


def device_kind() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class StepCollator:
    """A step's examples (this process's share) to packed micro-batches within the plan's budget."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        from .packing import pack

        sizes = [(len(r["input_ids"]), _labelled(r)) for r in rows]
        micro = []
        for group, checkpointed in self.plan.micro_batches(sizes):
            mb = pack([rows[i] for i in group])
            mb["checkpointed"] = checkpointed
            micro.append(mb)
        return {"micro": micro}


def _set_checkpointing(model: Any, on: bool) -> None:
    """Turn activation checkpointing on or off for the next forward pass (its function is set
    once by ``_enable_checkpointing``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = on


def _checkpointing_off(config_class: Any) -> dict[str, bool]:
    """The config argument that turns the trainer's own checkpointing off: transformers 5.24
    renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old one warns)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def _compile_layers(model: Any, hooks: Hooks) -> int:
    """``torch_compile``: compile each decoder layer in place (regional compilation: the layers
    share one compiled graph, so the first step pays for one layer, about 25 s on 2 CPU cores;
    shapes are dynamic, so micro-batches of other lengths reuse it). Not the whole model, as
    the trainer's own ``torch_compile`` would: the per-example attention of packed rows breaks
    the graph there. On the CPU, inductor builds its kernels with a C++ compiler; without one
    the job trains uncompiled and says so. Returns how many layers were compiled."""
    import shutil

    from transformers.modeling_layers import GradientCheckpointingLayer

    on_cpu = next(model.parameters()).device.type == "cpu"
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if on_cpu and not any(c and shutil.which(c) for c in compilers):
        hooks.on_message("torch_compile: no C++ compiler found (g++, clang++ or $CXX); training uncompiled")
        return 0
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _enable_checkpointing(model: Any) -> None:
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
    from .packing import pack

    return pack([{"input_ids": [0], "labels": [IGNORE]}])


def _trainer_class() -> Any:
    from trl import SFTTrainer

    class Trainer(SFTTrainer):  # type: ignore[misc]
        _checkpoint_per_micro_batch = False

        def _reduce(self, values: list[int], reduction: str) -> list[int]:
            """Element-wise sum or max over processes: one small collective."""
            import torch

            if self.accelerator.num_processes == 1:
                return values
            t = torch.tensor(values, device=self.args.device)
            if reduction == "max":
                return [-int(x) for x in self.accelerator.reduce(-t, reduction="min")]  # no "max" in accelerate
            return [int(x) for x in self.accelerator.reduce(t, reduction="sum")]

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            import contextlib

            import torch

            from .packing import packed_loss

            model.train()
            micro = list(inputs["micro"])
            (n_global,) = self._reduce([sum(int(m["label_target"].numel()) for m in micro)], "sum")
            (n_micro,) = self._reduce([len(micro)], "max")
            micro += [_empty_micro() for _ in range(n_micro - len(micro))]
            world = self.accelerator.num_processes
            total = torch.zeros((), device=self.args.device)
            hits = count = 0
            for k, mb in enumerate(micro):
                if self._checkpoint_per_micro_batch:
                    _set_checkpointing(model, bool(mb.get("checkpointed")))
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
            self._total_train_tokens += real
            self._metrics["train"]["mean_token_accuracy"].append(hits / count if count else 0.0)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return total

        def prediction_step(
            self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
        ) -> tuple[Any, None, None]:
            import torch

            from .packing import packed_loss

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

    return Trainer


def train(spec: TrainSpec, hooks: Hooks, extra_callbacks: list[Any] | None = None) -> TrainResult:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig

    from .chat_data import tokenize_file
    from .fused import fuse
    from .memory import (
        MemoryPlan,
        allocator_in_use,
        limit_heap_growth,
        make_plan,
        resident_bytes,
        saved_bytes_per_token,
    )
    from .packing import use_packed_attention

    allocator = allocator_in_use()
    if allocator == "system":  # a preloaded tcmalloc/jemalloc (allocator_env) reuses freed blocks itself
        limit_heap_growth()
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_data = tokenize_file(tokenizer, spec.training_file, spec.max_length)
    valid_data = tokenize_file(tokenizer, spec.validation_file, spec.max_length) if spec.validation_file else None
    train_rows = train_data.rows
    valid_rows = valid_data.rows if valid_data else None
    train_ds = Dataset.from_list(train_rows)
    valid_ds = Dataset.from_list(valid_rows) if valid_rows else None
    n_assistant = sum(_labelled(r) for r in train_rows)
    n_tokens = sum(len(r["input_ids"]) for r in train_rows)
    for what, data in (("training", train_data), ("validation", valid_data)):
        if data is not None and (data.n_truncated or data.n_too_long):
            hooks.on_message(
                f"{data.n_truncated} {what} example(s) longer than max_length {spec.max_length} had the middle of "
                "their longest user message shortened (answers are kept whole)"
                + (f"; {data.n_too_long} dropped: their answers alone exceed it" if data.n_too_long else "")
            )

    kind = device_kind()
    bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    before_model = resident_bytes()
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=dtype)
    model.config.use_cache = False
    attention = use_packed_attention(model)
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
        max_length=None,  # examples are already fitted to max_length, answers kept (chat_data)
        dataloader_num_workers=0,
        disable_tqdm=True,
        # torch_compile: the decoder layers are compiled one by one below (_compile_layers)
        remove_unused_columns=False,  # the collator reads input_ids and labels itself
        # TRL turns activation checkpointing on by default; it costs about 1.3x the compute, so
        # the memory plan turns it on only where an example needs it (memory.py), set up below
        **_checkpointing_off(SFTConfig),
    )

    class Bridge(TrainerCallback):
        """Trainer events to job events, checkpoints, and cancellation."""

        last: dict[str, Any] = {}
        stopped = False
        saved_step = -1  # the step of the latest checkpoint
        evaluated: tuple[int, dict[str, Any]] | None = None  # (step, metrics) of the latest evaluation

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
            if len(metrics) > 2:
                self.last.update(metrics)
                hooks.on_metrics(metrics)

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # one checkpoint per epoch, whatever save_steps says; but not a second one of the step
            # a pause just saved (the Trainer ends the epoch it stops in)
            control.should_save = state.global_step != self.saved_step

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.saved_step = state.global_step
            if state.is_world_process_zero:
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                hooks.on_checkpoint(state.global_step, path, dict(self.last))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if hooks.should_stop():
                self.stopped = True
                control.should_training_stop = True
                control.should_save = hooks.save_on_stop()

    bridge = Bridge()
    collator = StepCollator(None)  # its plan is made below, once the model it measures is built
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=peft_config,
        callbacks=[bridge, *(extra_callbacks or [])],
    )
    fused = fuse(trainer.model) if not trainer.is_fsdp_enabled else {}
    compiled = _compile_layers(trainer.model, hooks) if spec.torch_compile else 0
    if spec.plan is not None:
        plan = MemoryPlan.from_dict(spec.plan)  # a resumed job trains the same micro-batches
    else:
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        optimizer_bytes = trainable * 12  # gradient and AdamW's two moments, float32
        free_device = None
        if kind == "cuda":
            free_device = int(torch.cuda.mem_get_info()[0])
            static = param_bytes + optimizer_bytes + 512 * 2**20  # the CUDA context and kernels' workspace
        else:
            static = before_model + param_bytes + optimizer_bytes
        plan = make_plan(
            config=model.config,
            dtype_bytes=2 if bf16 else 4,
            static_bytes=static,
            examples=[(len(r["input_ids"]), _labelled(r)) for r in train_rows],
            batch_size=per_device,
            checkpointing=spec.gradient_checkpointing,
            memory_limit_gb=spec.memory_limit_gb,
            micro_batch_tokens=spec.micro_batch_tokens,
            device_free_bytes=free_device,
            seed=spec.seed,
            saved_bytes_per_token=saved_bytes_per_token(trainer.model, args.device),
        )
        hooks.on_plan(plan.to_dict())
    collator.plan = plan
    hooks.on_message(
        f"Training {len(train_rows)} examples ({n_tokens:,} tokens, {n_assistant:,} trained) for {spec.n_epochs} "
        f"epochs, batch {spec.batch_size}, {total_steps} steps, on {kind}"
        + (f" x{world}" if world > 1 else "")
        + f" ({spec.training_type}, packed sequences, {attention} attention"
        + (f", fused LoRA dropout in {fused['lora']} layers" if fused.get("lora") else "")
        + (f", fused SwiGLU in {fused['mlp']} MLPs" if fused.get("mlp") else "")
        + (f", {compiled} layers compiled" if compiled else "")
        + (f", {allocator} allocator" if kind == "cpu" else "")
        + ")"
    )
    hooks.on_message(plan.describe())
    if plan.checkpointing != "off":  # set up once; each micro-batch then says whether it is used
        _enable_checkpointing(trainer.model)
        _set_checkpointing(trainer.model, False)
    trainer._checkpoint_per_micro_batch = plan.checkpointing != "off"
    if spec.resume_from:
        hooks.on_message(f"Resuming from checkpoint {Path(spec.resume_from).name}")
    trainer.train(resume_from_checkpoint=spec.resume_from)
    full_loss = full_acc = None
    if not bridge.stopped:
        if valid_ds is not None:
            # the last epoch's evaluation, at the final step, is the full validation loss already
            # (the whole validation set, the final weights): not computed twice
            done = bridge.evaluated
            final = done[1] if done and done[0] == trainer.state.global_step else trainer.evaluate()
            full_loss = float(final["eval_loss"])
            full_acc = float(final["eval_mean_token_accuracy"]) if "eval_mean_token_accuracy" in final else None
        if trainer.is_world_process_zero():
            trained: Any = trainer.model
            trained.save_pretrained(spec.final_dir)
            tokenizer.save_pretrained(spec.final_dir)
            # how its prompts were shaped, so inference shortens long prompts the same way
            from ..atomic import write_text_atomic

            write_text_atomic(Path(spec.final_dir) / TRAINING_SHAPE, json.dumps({"max_length": spec.max_length}))
    seen = int(getattr(trainer, "_total_train_tokens", 0))
    return TrainResult(
        bridge.stopped,
        trainer.state.global_step,
        n_tokens * spec.n_epochs,
        full_loss,
        full_acc,
        seen,
        plan.to_dict(),
        train_data.n_truncated,
    )
