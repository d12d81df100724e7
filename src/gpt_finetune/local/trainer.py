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

from ..contract import DEFAULT_MAX_LENGTH, LoraOptions
from .chat_data import IGNORE, TRAINING_SHAPE
from .device import DeviceFacts, Precision


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
    lora: LoraOptions | dict[str, Any] = field(default_factory=LoraOptions)  # a dict: LoraOptions' fields
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
    allocator: str = "system"  # what the process runs on (worker.allocator), for the job's events
    method: str = "supervised"  # or "dpo": preference pairs (``dpo``)
    beta: float = 0.1  # DPO's beta
    init_adapter: str | None = None  # a fine-tuned model's LoRA adapter, continued (not a new one)


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
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]  # inductor's own lookup order
    if on_cpu and not any(c and shutil.which(c) for c in compilers):
        hooks.on_message("torch_compile: no C++ compiler found (g++, clang++ or $CXX); training uncompiled")
        return 0
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


@dataclass
class _Data:
    """A job's examples, tokenised and fitted to ``max_length``."""

    tokenizer: Any
    train_rows: list[dict[str, Any]]
    valid_rows: list[dict[str, Any]] | None
    n_tokens: int
    n_assistant: int
    n_truncated: int
    sizes: list[tuple[int, int]]  # (tokens, trained tokens) of each training row, for the memory plan


def _load_data(spec: TrainSpec, hooks: Hooks) -> _Data:
    from transformers import AutoTokenizer

    from .chat_data import tokenize_file

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.method == "dpo":
        return _load_pairs(spec, hooks, tokenizer)
    train_data = tokenize_file(tokenizer, spec.training_file, spec.max_length)
    valid_data = tokenize_file(tokenizer, spec.validation_file, spec.max_length) if spec.validation_file else None
    for what, data in (("training", train_data), ("validation", valid_data)):
        if data is not None and (data.n_truncated or data.n_too_long):
            hooks.on_message(
                f"{data.n_truncated} {what} example(s) longer than max_length {spec.max_length} had the middle of "
                "their longest user message shortened (answers are kept whole)"
                + (f"; {data.n_too_long} dropped: their answers alone exceed it" if data.n_too_long else "")
            )
    rows = train_data.rows
    return _Data(
        tokenizer,
        rows,
        valid_data.rows if valid_data else None,
        sum(len(r["input_ids"]) for r in rows),
        sum(_labelled(r) for r in rows),
        train_data.n_truncated,
        [(len(r["input_ids"]), _labelled(r)) for r in rows],
    )


def _load_pairs(spec: TrainSpec, hooks: Hooks, tokenizer: Any) -> _Data:
    """A DPO job's preference pairs, each as its two sequences (``dpo.tokenize_pair``)."""
    from .dpo import pair_size, tokenize_pairs

    train, n_truncated, n_too_long = tokenize_pairs(tokenizer, spec.training_file, spec.max_length)
    valid = tokenize_pairs(tokenizer, spec.validation_file, spec.max_length)[0] if spec.validation_file else None
    if n_truncated or n_too_long:
        hooks.on_message(
            f"{n_truncated} preference pair(s) longer than max_length {spec.max_length} had the middle of their "
            "longest user message shortened (answers are kept whole)"
            + (f"; {n_too_long} dropped: their answers alone exceed it" if n_too_long else "")
        )
    sizes = [pair_size(r) for r in train]
    return _Data(tokenizer, train, valid, sum(t for t, _ in sizes), sum(n for _, n in sizes), n_truncated, sizes)


def _lora_config(spec: TrainSpec) -> Any:
    if spec.training_type != "lora":
        return None
    from peft import LoraConfig

    lora = spec.lora if isinstance(spec.lora, LoraOptions) else LoraOptions.from_values(spec.lora)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # "all-linear" is PEFT's own: every linear layer but the output one, whatever the
        # architecture names them
        target_modules="all-linear" if tuple(lora.target_modules) == ("all-linear",) else list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def _training_args(
    spec: TrainSpec, per_device: int, log_every: int, dev: DeviceFacts, prec: Precision, evaluate: bool
) -> Any:
    """TRL's config for one job: its schedule, checkpoints and device; the rest is ours."""
    from trl import SFTConfig

    from .device import loader_workers

    world = _world_size()
    return SFTConfig(
        # a DPO job's rows are pairs, tokenised already (``dpo``): TRL must not look for text in them
        dataset_kwargs={"skip_prepare_dataset": True} if spec.method == "dpo" else None,
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
        eval_strategy="epoch" if evaluate else "no",
        save_strategy="steps" if spec.checkpoint_every_steps else "epoch",
        save_steps=spec.checkpoint_every_steps or 500,
        save_total_limit=3,
        report_to="none",
        bf16=prec.autocast == "bf16",
        fp16=prec.autocast == "fp16",
        use_cpu=dev.kind == "cpu",
        ddp_backend="gloo" if dev.kind == "cpu" and world > 1 else None,
        max_length=None,  # examples are already fitted to max_length, answers kept (chat_data)
        dataloader_num_workers=loader_workers(dev),
        dataloader_pin_memory=dev.kind == "cuda",
        dataloader_persistent_workers=loader_workers(dev) > 0,
        disable_tqdm=True,
        # torch_compile: the decoder layers are compiled one by one (_compile_layers)
        remove_unused_columns=False,  # the collator reads input_ids and labels itself
        # TRL turns activation checkpointing on by default; it costs about 1.3x the compute, so
        # the memory plan turns it on only where an example needs it (memory.py, use_plan)
        **_checkpointing_off(SFTConfig),
    )


def _world_size() -> int:
    """Processes training together: accelerate's launcher tells each one in WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _memory_plan(
    spec: TrainSpec,
    trainer: Any,
    model: Any,
    data: _Data,
    per_device: int,
    dev: DeviceFacts,
    prec: Precision,
    before_model: int,
) -> Any:
    """The stored plan of a resumed job, else one made for this model on this machine (on a GPU:
    against its memory free before the model was loaded, the weights counted in ``static``)."""
    from .memory import MemoryPlan, make_plan, saved_bytes_per_token

    if spec.plan is not None:
        return MemoryPlan.from_dict(spec.plan)  # a resumed job trains the same micro-batches
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    optimizer_bytes = trainable * 12  # gradient and AdamW's two moments, float32
    free_device = None
    if dev.kind == "cuda":
        free_device = dev.free_bytes  # read with the CUDA context already made (device.facts)
        static = param_bytes + optimizer_bytes + 512 * 2**20  # the kernels' workspaces (cuBLAS, attention)
    else:
        static = before_model + param_bytes + optimizer_bytes
    return make_plan(
        config=model.config,
        dtype_bytes=prec.activation_bytes,
        static_bytes=static,
        examples=data.sizes,
        batch_size=per_device,
        checkpointing=spec.gradient_checkpointing,
        memory_limit_gb=spec.memory_limit_gb,
        micro_batch_tokens=spec.micro_batch_tokens,
        device_free_bytes=free_device,
        seed=spec.seed,
        saved_bytes_per_token=saved_bytes_per_token(trainer.model, trainer.args.device),
    )


def _attach_reference(spec: TrainSpec, trainer: Any, data: _Data, plan: Any, hooks: Hooks) -> None:
    """Give each pair its reference log-probabilities (``dpo``): read back from the job's
    checkpoint directory when a run before this one computed them for the same data, else
    computed now on the starting model and stored there."""
    import time

    from datasets import Dataset

    from .dpo import REFERENCE_FILE, attach_reference, data_key, load_or_compute_reference, pair_logps

    # the reference is the starting model: a new adapter switched off, or, continuing a
    # fine-tuned model's adapter, that model as it starts (its figures are computed before the
    # first step, so they are its own)
    lora = spec.training_type == "lora" and not spec.init_adapter
    valid = data.valid_rows or []

    def compute() -> dict[str, list[list[float]]]:
        t0 = time.time()
        out = {
            "train": pair_logps(trainer.model, data.train_rows, plan, trainer.args.device, lora),
            "valid": pair_logps(trainer.model, valid, plan, trainer.args.device, lora),
        }
        hooks.on_message(
            f"Reference log-probabilities of {len(data.train_rows) + len(valid)} pairs computed in "
            f"{time.time() - t0:.0f} s (the starting model{' without its adapter' if lora else ''})"
        )
        return out

    logps = load_or_compute_reference(Path(spec.output_dir) / REFERENCE_FILE, data_key(data.train_rows, valid), compute)
    trainer.train_dataset = Dataset.from_list(attach_reference(data.train_rows, logps["train"]))
    if valid:
        trainer.eval_dataset = Dataset.from_list(attach_reference(valid, logps["valid"]))


def _continue_adapter(spec: TrainSpec, model: Any, hooks: Hooks) -> Any:
    """A job on a fine-tuned model: its adapter loaded trainable (LoRA: training goes on from
    it, with its own rank and layers; of the job's LoRA settings only the dropout applies, a
    setting of training rather than of the adapter's shape) or merged into the weights (full
    training)."""
    if not spec.init_adapter:
        return model
    from peft import PeftModel

    if spec.training_type == "full":
        hooks.on_message("Starting from the fine-tuned model's weights (its adapter merged), training every weight")
        return PeftModel.from_pretrained(model, spec.init_adapter).merge_and_unload()
    import torch

    peft_model = PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
    # PEFT builds the dropout its saved config names (the first job's); this job's own applies:
    # a DPO job's 0 above all, whose policy must score as its reference did at the first step
    p = (spec.lora if isinstance(spec.lora, LoraOptions) else LoraOptions.from_values(spec.lora)).dropout
    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for key in list(drops.keys()):
                drops[key] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
    cfg = peft_model.peft_config["default"]
    cfg.lora_dropout = p
    hooks.on_message(
        f"Continuing the fine-tuned model's adapter (LoRA r {cfg.r}, alpha {cfg.lora_alpha}, "
        f"{', '.join(sorted(cfg.target_modules))})"
    )
    return peft_model


def _final_validation(trainer: Any, callback: Any) -> tuple[float | None, float | None]:
    """The full validation loss of the final weights: the last epoch's evaluation when it ran at
    the final step (the whole validation set already: not computed twice), else one more."""
    if trainer.eval_dataset is None:
        return None, None
    done = callback.evaluated
    final = done[1] if done and done[0] == trainer.state.global_step else trainer.evaluate()
    acc = float(final["eval_mean_token_accuracy"]) if "eval_mean_token_accuracy" in final else None
    return float(final["eval_loss"]), acc


def _save_final(spec: TrainSpec, trainer: Any, tokenizer: Any) -> None:
    from ..atomic import write_text_atomic

    trainer.model.save_pretrained(spec.final_dir)
    tokenizer.save_pretrained(spec.final_dir)
    # how its prompts were shaped, so inference shortens long prompts the same way
    write_text_atomic(Path(spec.final_dir) / TRAINING_SHAPE, json.dumps({"max_length": spec.max_length}))


def train(spec: TrainSpec, hooks: Hooks, extra_callbacks: list[Any] | None = None) -> TrainResult:
    """Train one job: load its data and model, plan its memory, run TRL's loop, save the result."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from . import device
    from .fused import fuse
    from .machine import resident_bytes
    from .packing import use_packed_attention
    from .sft import JobCallback, PackedSFTTrainer

    data = _load_data(spec, hooks)
    dev = device.facts()
    prec = device.precision(dev, spec.training_type)
    before_model = resident_bytes()
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=prec.dtype)
    model.config.use_cache = False
    model = _continue_adapter(spec, model, hooks)
    attention = use_packed_attention(model, device.attention(dev))

    world = _world_size()
    per_device = max(1, spec.batch_size // world)
    total_steps = math.ceil(len(data.train_rows) / (per_device * world)) * spec.n_epochs
    log_every = spec.log_every_steps or max(1, total_steps // 100)
    valid_ds = Dataset.from_list(data.valid_rows) if data.valid_rows else None
    callback = JobCallback(hooks)
    dpo = spec.method == "dpo"
    trainer_class: Any = PackedSFTTrainer
    collator: Any = StepCollator(None)  # its plan is made below, once the model it measures is built
    if dpo:
        from .dpo import PackedDPOTrainer, StepPairCollator

        trainer_class, collator = PackedDPOTrainer, StepPairCollator(None)
    trainer = trainer_class(
        model=model,
        args=_training_args(spec, per_device, log_every, dev, prec, valid_ds is not None),
        train_dataset=Dataset.from_list(data.train_rows),
        eval_dataset=valid_ds,
        processing_class=data.tokenizer,
        data_collator=collator,
        peft_config=None if spec.init_adapter else _lora_config(spec),
        callbacks=[callback, *(extra_callbacks or [])],
    )
    fused = fuse(trainer.model) if not trainer.is_fsdp_enabled else {}
    compiled = _compile_layers(trainer.model, hooks) if spec.torch_compile else 0
    plan = _memory_plan(spec, trainer, model, data, per_device, dev, prec, before_model)
    if spec.plan is None:
        hooks.on_plan(plan.to_dict())
    trainer.use_plan(plan)
    if dpo:
        trainer.beta = spec.beta
        _attach_reference(spec, trainer, data, plan, hooks)
    what = "preference pairs" if dpo else "examples"
    hooks.on_message(
        f"Training {len(data.train_rows)} {what} ({data.n_tokens:,} tokens, {data.n_assistant:,} trained) for "
        f"{spec.n_epochs} epochs, batch {spec.batch_size}, {total_steps} steps, on {dev.describe()}"
        + (f" x{world}" if world > 1 else "")
        + (f" (dpo, beta {spec.beta:g}; " if dpo else " (")
        + f"{spec.training_type}, packed sequences, {attention} attention"
        + (f", fused LoRA dropout in {fused['lora']} layers" if fused.get("lora") else "")
        + (f", fused SwiGLU in {fused['mlp']} MLPs" if fused.get("mlp") else "")
        + (f", {compiled} layers compiled" if compiled else "")
        + (f", {prec.describe()}" if dev.kind == "cuda" else "")
        + (f", {spec.allocator} allocator" if dev.kind == "cpu" else "")
        + ")"
    )
    hooks.on_message(plan.describe())
    if spec.resume_from:
        hooks.on_message(f"Resuming from checkpoint {Path(spec.resume_from).name}")
    trainer.train(resume_from_checkpoint=spec.resume_from)
    full_loss = full_acc = None
    if not callback.stopped:
        full_loss, full_acc = _final_validation(trainer, callback)
        if trainer.is_world_process_zero():
            _save_final(spec, trainer, data.tokenizer)
    return TrainResult(
        callback.stopped,
        trainer.state.global_step,
        data.n_tokens * spec.n_epochs,
        full_loss,
        full_acc,
        trainer.real_tokens,
        plan.to_dict(),
        data.n_truncated,
    )
