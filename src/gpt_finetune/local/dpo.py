"""Preference fine-tuning (OpenAI's ``method: dpo``) on the trainer's packed micro-batches.

The loss is DPO's (Rafailov et al., 2023; TRL's ``DPOTrainer`` with its default sigmoid loss):
for a pair whose preferred answer has log-probability ``pc`` under the model in training and
``rc`` under the reference model, and the other answer ``pr`` and ``rr``,

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))

with TRL's figures beside it: ``rewards/chosen`` = beta (pc - rc), ``rewards/rejected`` =
beta (pr - rr), ``rewards/margins`` their difference, ``rewards/accuracies`` how often the chosen
answer's reward is the higher one.

Why not TRL's ``DPOTrainer`` itself: it pads each pair's two sequences to the longest in the
batch and runs the reference model in every step (a second forward pass per step, and, for full
training, a second copy of the model in memory). Here:

- a pair's two sequences (the shared prompt, then each answer) are packed with other pairs'
  into the padding-free micro-batches of the SFT path (``packing``), planned by the same memory
  plan, a pair counted as both its sequences (a pair is never split across micro-batches: its
  loss needs both);
- the reference log-probabilities are computed once, before the first step, with the adapter
  switched off (LoRA: the starting model is the base without its adapter) or on the starting
  weights (full training), and kept with the job's checkpoints, so a resumed job reads them
  back; no reference copy is held during training. Exact, since the reference never changes.

``bench/dpo_bench.py`` measures this against ``DPOTrainer`` on the same pairs.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .chat_data import IGNORE, fit_messages, tokenize_example
from .packing import pack
from .sft import PackedSFTTrainer

REFERENCE_FILE = "reference_logps.json"  # beside the checkpoints: what a resumed job reads back
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _labelled(labels: list[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE)


def tokenize_pair(tokenizer: Any, example: dict[str, Any], max_length: int) -> dict[str, Any] | None:
    """A preference pair's two sequences: the input conversation (its assistant turns not
    trained on) followed by each answer, the loss labels on the answer only. A long prompt is
    shortened once, for the longer answer, and the same prompt serves both, so the two
    sequences share their prompt exactly. None when the answers alone do not fit."""
    from ..data.messages import text_messages

    prompt = [
        {**m, "weight": 0} if m.get("role") == "assistant" else m for m in text_messages(example["input"]["messages"])
    ]
    chosen = text_messages(example["preferred_output"])[0]
    rejected = text_messages(example["non_preferred_output"])[0]
    longer = max((chosen, rejected), key=lambda m: len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]))
    fitted = fit_messages(tokenizer, [*prompt, longer], max_length)
    if fitted is None:
        return None
    shortened, truncated = fitted
    prompt = shortened[:-1]
    c = tokenize_example(tokenizer, [*prompt, chosen])
    r = tokenize_example(tokenizer, [*prompt, rejected])
    assert c is not None and r is not None
    if not _labelled(c["labels"]) or not _labelled(r["labels"]):
        return None
    return {
        "chosen_ids": c["input_ids"],
        "chosen_labels": c["labels"],
        "rejected_ids": r["input_ids"],
        "rejected_labels": r["labels"],
        "truncated": truncated,
    }


def tokenize_pairs(tokenizer: Any, path: str, max_length: int) -> tuple[list[dict[str, Any]], int, int]:
    """(pairs, prompts shortened, pairs dropped because their answers alone are too long)."""
    rows, n_truncated, n_too_long = [], 0, 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = tokenize_pair(tokenizer, json.loads(line), max_length)
            if row is None:
                n_too_long += 1
                continue
            n_truncated += bool(row.pop("truncated"))
            rows.append(row)
    if not rows:
        raise DataError(f"no preference pair fits within max_length {max_length}", path=path)
    return rows, n_truncated, n_too_long


def pair_size(row: dict[str, Any]) -> tuple[int, int]:
    """(tokens, labelled tokens) of a pair as the memory plan counts it: both sequences."""
    return (
        len(row["chosen_ids"]) + len(row["rejected_ids"]),
        _labelled(row["chosen_labels"]) + _labelled(row["rejected_labels"]),
    )


def pack_pairs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairs to one packed micro-batch: chosen, rejected, chosen, ... back to back, with
    ``label_seq`` naming the sequence (2k chosen, 2k+1 rejected of pair k) of each label, and the
    pairs' reference log-probabilities when the rows carry them."""
    seqs = []
    for row in rows:
        seqs.append({"input_ids": row["chosen_ids"], "labels": row["chosen_labels"]})
        seqs.append({"input_ids": row["rejected_ids"], "labels": row["rejected_labels"]})
    mb = pack(seqs)
    mb["label_seq"] = torch.tensor(
        [k for k, s in enumerate(seqs) for _ in range(_labelled(s["labels"]))], dtype=torch.long
    )
    mb["n_pairs"] = len(rows)
    if rows and "ref_chosen" in rows[0]:
        mb["ref"] = torch.tensor([[r["ref_chosen"], r["ref_rejected"]] for r in rows], dtype=torch.float32)
    return mb


def sequence_logps(model: Any, mb: dict[str, Any]) -> Any:
    """Each packed sequence's summed log-probability of its labels: (pairs, 2), chosen first."""
    index, target, seq = mb["label_index"], mb["label_target"], mb["label_seq"]
    out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], logits_to_keep=index, use_cache=False)
    logits = out.logits[0].float()
    token_logps = -torch.nn.functional.cross_entropy(logits, target.to(logits.device), reduction="none")
    sums = torch.zeros(2 * int(mb["n_pairs"]), device=logits.device, dtype=token_logps.dtype)
    sums = sums.index_add(0, seq.to(logits.device), token_logps)
    return sums.view(-1, 2)


def dpo_loss(policy: Any, reference: Any, beta: float) -> tuple[Any, dict[str, Any]]:
    """Summed DPO loss of a micro-batch's pairs and their per-pair figures (TRL's names)."""
    chosen = beta * (policy[:, 0] - reference[:, 0])
    rejected = beta * (policy[:, 1] - reference[:, 1])
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).sum()
    d = {"chosen": chosen.detach(), "rejected": rejected.detach()}
    return loss, d


class StepPairCollator:
    """A step's pairs to packed micro-batches within the memory plan's budget."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        micro = []
        for group, checkpointed in self.plan.micro_batches([pair_size(r) for r in rows]):
            mb = pack_pairs([rows[i] for i in group])
            mb["checkpointed"] = checkpointed
            micro.append(mb)
        return {"micro": micro}


def pair_logps(
    model: Any, rows: list[dict[str, Any]], plan: Any, device: Any, adapter_off: bool = False
) -> list[list[float]]:
    """``model``'s (chosen, rejected) log-probabilities of each pair (with ``adapter_off``, of
    the model without its LoRA adapter: the reference of a LoRA job). No gradients, in the
    plan's micro-batches (without a plan, eight pairs at a time)."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = [[0.0, 0.0] for _ in rows]
    try:
        with torch.no_grad(), model.disable_adapter() if adapter_off else contextlib.nullcontext():
            step = 64
            for start in range(0, len(rows), step):
                chunk = list(range(start, min(start + step, len(rows))))
                groups = (
                    [g for g, _ in plan.micro_batches([pair_size(rows[i]) for i in chunk])]
                    if plan is not None
                    else [list(range(k, min(k + 8, len(chunk)))) for k in range(0, len(chunk), 8)]
                )
                for group in groups:
                    idx = [chunk[g] for g in group]
                    mb = pack_pairs([rows[i] for i in idx])
                    mb = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
                    for i, lp in zip(idx, sequence_logps(model, mb).tolist()):
                        out[i] = lp
    finally:
        model.train(was_training)
    return out


def attach_reference(rows: list[dict[str, Any]], logps: list[list[float]]) -> list[dict[str, Any]]:
    return [{**r, "ref_chosen": lp[0], "ref_rejected": lp[1]} for r, lp in zip(rows, logps)]


def load_or_compute_reference(path: Path, key: str, compute: Any) -> dict[str, list[list[float]]]:
    """The reference log-probabilities stored at ``path`` for this data (``key``), else computed
    (``compute()``) and stored, written atomically: a resumed job must score against the same
    reference, and recomputing it costs a pass over the data."""
    from ..atomic import write_text_atomic

    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return dict(stored["logps"])
    logps = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, "logps": logps}))
    return dict(logps)


def data_key(*parts: list[dict[str, Any]]) -> str:
    """A fingerprint of the tokenised pairs, so stored reference figures are never read for
    other data."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for rows in parts:
        for r in rows:
            h.update(
                json.dumps([r["chosen_ids"], r["chosen_labels"], r["rejected_ids"], r["rejected_labels"]]).encode()
            )
        h.update(b"|")
    return h.hexdigest()


class PackedDPOTrainer(PackedSFTTrainer):
    """The packed trainer with DPO's loss: each micro-batch holds whole pairs; its loss is the
    summed pair loss over the pairs of the whole step (all processes), so the accumulated
    gradient is that of the step's mean loss, whatever the split."""

    beta: float = 0.1

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        from .packing import packed_loss
        from .sft import _empty_micro, set_checkpointing

        model.train()
        micro = list(inputs["micro"])
        (n_global,) = self._reduce([sum(int(m["n_pairs"]) for m in micro)], "sum")
        (n_micro,) = self._reduce([len(micro)], "max")
        world = self.accelerator.num_processes
        total = torch.zeros((), device=self.args.device)
        figures: list[dict[str, Any]] = []
        for k in range(n_micro):
            sync = k == n_micro - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
            if k >= len(micro):  # a process with fewer micro-batches: the same number of passes
                with ctx, self.compute_loss_context_manager():
                    zero, _, _ = packed_loss(model, self._prepare_inputs(_empty_micro()))
                    self.accelerator.backward(zero)
                continue
            mb = micro[k]
            if self.checkpoint_per_micro_batch:
                set_checkpointing(model, bool(mb.get("checkpointed")))
            mb = self._prepare_inputs(mb)
            with ctx, self.compute_loss_context_manager():
                loss, d = dpo_loss(sequence_logps(model, mb), mb["ref"], self.beta)
                scaled = loss * (world / max(n_global, 1))
                self.accelerator.backward(scaled)
            total += scaled.detach()
            figures.append(d)
            del loss, scaled
        self._record("train", figures)
        real = sum(int(m["input_ids"].numel()) for m in inputs["micro"])
        (real,) = self._reduce([real], "sum")
        self.real_tokens += real
        self._total_train_tokens = self.real_tokens
        self._metrics["train"]["num_tokens"] = [self.real_tokens]
        return total

    def _record(self, mode: str, figures: list[dict[str, Any]]) -> None:
        """The step's (or evaluation batch's) mean rewards, margin and accuracy, all processes."""
        if not figures:
            return
        chosen = torch.cat([d["chosen"] for d in figures]).float()
        rejected = torch.cat([d["rejected"] for d in figures]).float()
        sums = torch.stack(
            [chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), torch.tensor(float(chosen.numel()))]
        ).to(self.args.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        c, r, hits, n = (float(x) for x in sums.tolist())
        n = max(n, 1.0)
        for name, value in zip(METRICS, (c / n, r / n, (c - r) / n, hits / n)):
            self._metrics[mode][name].append(value)

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[Any, None, None]:
        total = torch.zeros((), device=self.args.device)
        pairs = 0
        figures = []
        with torch.no_grad():
            for mb in inputs["micro"]:
                mb = self._prepare_inputs(mb)
                loss, d = dpo_loss(sequence_logps(model, mb), mb["ref"], self.beta)
                total += loss
                pairs += int(mb["n_pairs"])
                figures.append(d)
        self._record("eval", figures)
        return total / max(pairs, 1), None, None


def preference_accuracy(model: Any, rows: list[dict[str, Any]], device: Any, plan: Any = None) -> tuple[float, float]:
    """How often ``model`` gives the chosen answer the higher log-probability, and the mean
    margin (chosen minus rejected, in nats), over ``rows``: the figure ``eval`` reports."""
    logps = pair_logps(model, rows, plan, device, adapter_off=False)
    hits = sum(1 for c, r in logps if c > r)
    margin = sum(c - r for c, r in logps) / max(len(logps), 1)
    return hits / max(len(logps), 1), margin if math.isfinite(margin) else float("nan")
