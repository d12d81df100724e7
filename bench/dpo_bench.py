"""Preference fine-tuning: this project's DPO against TRL's DPOTrainer on the same pairs, side by side.

    python bench/dpo_bench.py --data ../shared/data/nlbse24_sample.json --workdir DIR \
        [--n-train 64] [--max-length 512] [--epochs 1] [--runs base,ours,trl]

The pairs come from the real issue sample: ``prepare --task-type classification --split 0.2
--seed 0`` splits it (the held-out 60 are never trained on), and each issue becomes a pair whose
preferred answer is its label and whose other answer is the wrong label a TF-IDF + logistic
regression classifier (fitted on the training issues only) finds most likely for it: the
confusable one. Each prompt is shortened once (the middle of the issue, ``fit_messages``) so that
both sequences of a pair fit ``--max-length``: both trainers then see exactly the same tokens
(TRL would otherwise cut the end, the answer, of a long issue).

Runs, each in a fresh process (the allocator jobs preload, tcmalloc where installed, for both):
``ours`` is the project's trainer as a DPO job runs it (packed micro-batches, the reference
computed once, adapter off); ``trl`` is TRL's DPOTrainer with its defaults (reference forward
pass every step, padded batches), batch 2 with 4 accumulation steps (the same 8 pairs a step; 8 at
once pads 16 sequences and holds their full-vocabulary logits), with its default activation
checkpointing; ``trl-nogc`` the same with checkpointing off (as ours runs here);
``ours-at-trl-memory`` ours with the memory plan's target set to TRL's measured peak (after
``trl``), for the comparison at equal memory. Same LoRA (r 8, alpha 16, q/k/v/o,
dropout 0), learning rate, beta, epochs and seed. We time the training call (ours includes its
reference pass, TRL's its per-step reference passes) and sample peak RSS. Afterwards one
evaluator scores every adapter and the base model on the held-out pairs: how often the chosen
answer gets the higher log-probability, with a bootstrap interval, and paired against ``ours``.
Raw results go to DIR/dpo_bench.json; a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYS = "Label the GitHub issue as bug, feature or question."
sys.path.insert(0, str(HERE))
from train_bench import peak_rss_sampler  # noqa: E402  (the same sampler, beside this script)

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


# ---- the pairs ----------------------------------------------------------------------------------------
def build_pairs(data: Path, workdir: Path, max_length: int, model_dir: str) -> tuple[Path, Path]:
    train_out, valid_out = workdir / "pairs.jsonl", workdir / "pairs.valid.jsonl"
    if train_out.is_file() and valid_out.is_file():
        return train_out, valid_out
    from transformers import AutoTokenizer

    from gpt_finetune.data.convert import ConvertOptions
    from gpt_finetune.data.labels import format_labels, parse_labels
    from gpt_finetune.data.prepare import prepare
    from gpt_finetune.eval.baseline import TfidfBaseline
    from gpt_finetune.local.chat_data import fit_messages

    issues = workdir / "issues.jsonl"
    prepare(data, issues, options=ConvertOptions(sys_prompt=SYS, task_type="classification"), split=0.2, seed=0)
    tok = AutoTokenizer.from_pretrained(model_dir)

    def rows(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def text(r: dict[str, Any]) -> str:
        return "\n".join(m["content"] for m in r["messages"] if m["role"] != "assistant")

    train, valid = rows(issues), rows(workdir / "issues.valid.jsonl")
    labels = sorted({x for r in train for x in parse_labels(r["messages"][-1]["content"])})
    clf = TfidfBaseline().fit(
        [text(r) for r in train], [parse_labels(r["messages"][-1]["content"]) for r in train], labels
    )

    def pairs(part: list[dict[str, Any]]) -> list[str]:
        scores = clf._scores([text(r) for r in part])
        out = []
        for r, s in zip(part, scores, strict=True):
            right = parse_labels(r["messages"][-1]["content"])
            wrong = max((x for x in labels if x not in right), key=lambda x: s[labels.index(x)])
            chosen = r["messages"][-1]["content"]
            rejected = format_labels([wrong], "seed")
            longer = max(chosen, rejected, key=len)
            fitted = fit_messages(tok, [*r["messages"][:-1], {"role": "assistant", "content": longer}], max_length)
            assert fitted is not None
            prompt = fitted[0][:-1]
            out.append(
                json.dumps(
                    {
                        "input": {"messages": prompt},
                        "preferred_output": [{"role": "assistant", "content": chosen}],
                        "non_preferred_output": [{"role": "assistant", "content": rejected}],
                    }
                )
            )
        return out

    train_out.write_text("\n".join(pairs(train)) + "\n", encoding="utf-8")
    valid_out.write_text("\n".join(pairs(valid)) + "\n", encoding="utf-8")
    return train_out, valid_out


def read_pairs(path: Path, n: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n] if n else rows


# ---- one run in its own process -------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    from gpt_finetune.local.trainer import Hooks, TrainSpec, train

    limit = None
    if args.run == "ours-at-trl-memory":  # the memory plan's target set to TRL's measured peak
        trl = json.loads((Path(args.workdir) / "runs" / "trl" / "result.json").read_text())
        limit = round(trl["peak_rss"] / 2**30, 2)

    spec = TrainSpec(
        model_dir=args.model_dir,
        training_file=str(data),
        validation_file=None,
        output_dir=str(out / "ckpt"),
        final_dir=str(out / "final"),
        n_epochs=args.epochs,
        batch_size=8,
        learning_rate=args.lr,
        seed=0,
        lora=LORA,
        max_length=args.max_length,
        method="dpo",
        beta=args.beta,
        log_every_steps=1,
        memory_limit_gb=limit,
    )
    messages: list[str] = []
    t0 = time.time()
    result = train(spec, Hooks(on_message=messages.append))
    return {
        "seconds": time.time() - t0,
        "tokens": result.tokens_seen,
        "steps": result.global_step,
        "messages": messages,
    }


def run_trl(args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from gpt_finetune.local.trainer import _checkpointing_off

    rows = read_pairs(data)
    ds = Dataset.from_list(
        [
            {"prompt": r["input"]["messages"], "chosen": r["preferred_output"], "rejected": r["non_preferred_output"]}
            for r in rows
        ]
    )
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(out / "ckpt"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        beta=args.beta,
        max_length=args.max_length,
        seed=0,
        data_seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **({} if args.run == "trl" else _checkpointing_off(DPOConfig)),
    )
    peft = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=peft)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    trainer.model.save_pretrained(out / "final")
    return {"seconds": seconds, "steps": trainer.state.global_step}


def child(args: argparse.Namespace) -> None:
    out = Path(args.workdir) / "runs" / args.run
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.workdir) / "train-subset.jsonl"
    stop, peak = peak_rss_sampler()
    result = run_ours(args, data, out) if args.run.startswith("ours") else run_trl(args, data, out)
    stop.set()
    result["peak_rss"] = peak[0]
    (out / "result.json").write_text(json.dumps(result, indent=1))


# ---- scoring ---------------------------------------------------------------------------------------------
def score(args: argparse.Namespace, runs: list[str], valid: Path) -> dict[str, list[float]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_finetune.local.dpo import pair_logps, tokenize_pair
    from gpt_finetune.local.packing import use_packed_attention

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [tokenize_pair(tok, p, args.max_length) for p in read_pairs(valid)]
    margins = {}
    for run in ["base", *runs]:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        if run != "base":
            model = PeftModel.from_pretrained(model, Path(args.workdir) / "runs" / run / "final")
        use_packed_attention(model)
        margins[run] = [c - r for c, r in pair_logps(model, rows, None, "cpu")]
    return margins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--runs", default="trl,ours,ours-at-trl-memory")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model_dir is None:
        from gpt_finetune.base_catalog import resolve_base
        from gpt_finetune.home import Home
        from gpt_finetune.local.base_weights import model_dir

        args.model_dir = str(model_dir(resolve_base("SmolLM2-135M-Instruct"), Home()))
    if args.run:
        child(args)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train, valid = build_pairs(args.data, work, args.max_length, args.model_dir)
    subset = work / "train-subset.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in read_pairs(train, args.n_train)), encoding="utf-8")
    from gpt_finetune.worker.allocator import allocator_env

    env = dict(os.environ)
    env.update(allocator_env(env))
    runs = args.runs.split(",")
    results = {}
    for run in runs:
        cmd = [sys.executable, __file__, "--run", run, "--workdir", str(work), "--model-dir", args.model_dir]
        cmd += ["--max-length", str(args.max_length), "--epochs", str(args.epochs), "--lr", str(args.lr)]
        cmd += ["--beta", str(args.beta)]
        print(f"[{time.strftime('%H:%M:%S')}] {run}", flush=True)
        subprocess.run(cmd, env=env, check=True)
        results[run] = json.loads((work / "runs" / run / "result.json").read_text())
    margins = score(args, runs, valid)
    from transformers import AutoTokenizer

    from gpt_finetune.eval.preference import summary
    from gpt_finetune.local.dpo import pair_size, tokenize_pair

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tokens = sum(pair_size(tokenize_pair(tok, p, args.max_length))[0] for p in read_pairs(subset)) * args.epochs
    n_pairs = len(read_pairs(subset)) * args.epochs
    print(f"\n{n_pairs} pairs ({tokens:,} tokens) trained per run; {len(margins['base'])} held-out pairs\n")
    print(
        "| run | seconds | pairs/s | tokens/s | peak RSS | held-out preference accuracy (95 %) | vs ours | mean margin |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in ["base", *runs]:
        s = summary(margins[run], margins.get("ours") if run != "ours" and "ours" in margins else None)
        lo, hi = s["preference_accuracy_95"]
        vs = s.get("accuracy_vs_first")
        r = results.get(run)
        speed = (
            f"{r['seconds']:.0f} | {n_pairs / r['seconds']:.3f} | {tokens / r['seconds']:.0f} | {r['peak_rss'] / 2**30:.2f} GB"
            if r
            else "| | |"
        )
        print(
            f"| {run} | {speed} | {s['preference_accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | "
            + (f"{vs[0]:+.3f} ({vs[1]:+.3f} to {vs[2]:+.3f})" if vs else "")
            + f" | {s['mean_margin']:+.2f} |"
        )
        if r:
            r["held_out"] = s
    (work / "dpo_bench.json").write_text(
        json.dumps({"args": vars(args) | {"data": str(args.data)}, "runs": results, "margins": margins}, indent=1)
    )


if __name__ == "__main__":
    main()
