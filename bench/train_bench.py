"""Training throughput: this project's trainer against a plain TRL SFTTrainer run, side by side.

    python bench/train_bench.py [--epochs 1] [--max-steps N] [--runs plain,plain-fp32,ours,ours#1]

Every run trains the same LoRA (r 8, alpha 16, q/k/v/o), learning rate, batch size, epochs and
seed on the same prepared example data (examples/issues.json), each in a fresh process; we time
``trainer.train()`` and sample the process's peak RSS. Runs (see RUNS): ``plain`` is TRL's
SFTTrainer with default settings otherwise (the baseline: it tokenises the chat itself and
computes the loss over the whole sequence); ``plain-fp32`` the same with bf16 off; ``masked`` TRL's
defaults given our assistant-only labels (the same objective as ours), ``masked-fp32`` with bf16
off; ``ours`` the project's trainer as jobs run it;
``ours-gc`` the same with activation checkpointing on; ``ours-glibc`` on the system allocator
instead of the caching allocator jobs preload (``trl-ga-fastmalloc``: TRL given it;
``ours-tcmalloc``, ``ours-jemalloc``, ``ours-mimalloc``: each one by name); ``ours-al`` with LoRA r 16 on every linear layer; ``ours-compile`` with ``torch_compile``; ``#N`` picks seed N. Throughput counts
real (non-padding) tokens. Afterwards one evaluator measures every adapter's (and the base
model's) validation loss on assistant tokens only, so quality is compared on the same footing,
with a paired bootstrap interval (over validation examples) of each run's difference from
``ours``. Prints a Markdown table; the raw numbers go to bench/out/train_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LORA = dict(
    r=8,
    lora_alpha=16,
    lora_dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    task_type="CAUSAL_LM",
)

ALL_LINEAR = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def peak_rss_sampler() -> tuple[threading.Event, list[int]]:
    import psutil

    stop, peak = threading.Event(), [0]
    proc = psutil.Process()

    def loop() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=loop, daemon=True).start()
    return stop, peak


# Runs: kind -> label. A run may end in "#N" to train with seed N instead of 0 (e.g. "ours#1").
RUNS = {
    "plain": "plain TRL SFTTrainer (defaults)",
    "plain-fp32": "TRL defaults, bf16 off",
    "masked": "TRL defaults + our assistant-only labels",
    "masked-fp32": "TRL defaults + our assistant-only labels, bf16 off",
    "ours": "gpt-finetune trainer",
    "ours-gc": "gpt-finetune trainer, activation checkpointing on",
    # the classification setting of README "Settings for classification": LoRA r 16 on every linear layer
    "ours-al": "gpt-finetune trainer, LoRA r16 on all linear layers",
    "ours-compile": "gpt-finetune trainer, torch_compile (decoder layers compiled)",
    # what a TRL user would do on long examples (bf16 off, our labels, TRL's default checkpointing):
    "trl-ga": "TRL + our labels, bf16 off, micro-batches of 1 x gradient accumulation",
    "trl-pf": "TRL + our labels, bf16 off, padding_free",
    # the allocator's share: ours on glibc's allocator, and TRL given the allocator ours uses
    "ours-glibc": "gpt-finetune trainer, system allocator",
    # each caching allocator by name (README "Allocator"): Debian's tcmalloc and jemalloc, and the
    # mimalloc that the project's own install brings (cmeel-mimalloc), for bench/README "Allocators"
    "ours-tcmalloc": "gpt-finetune trainer, tcmalloc (libtcmalloc-minimal4)",
    "ours-jemalloc": "gpt-finetune trainer, jemalloc (libjemalloc2)",
    "ours-mimalloc": "gpt-finetune trainer, mimalloc (cmeel-mimalloc, from pip)",
    "trl-ga-fastmalloc": "TRL + our labels, bf16 off, micro-batches of 1 x gradient accumulation, our allocator",
}


def child_env(name: str) -> dict[str, str]:
    """A run's environment: ours as jobs start it (tcmalloc/jemalloc preloaded when installed,
    ``allocator_env``), TRL as a user starts it, and the two crossed runs."""
    from gpt_finetune.worker.allocator import allocator_env

    kind, _ = split_kind(name)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    named = {
        "ours-glibc": "system",
        "ours-tcmalloc": "tcmalloc_minimal",
        "ours-jemalloc": "jemalloc",
        "ours-mimalloc": "mimalloc",
    }
    choice = named.get(kind, os.environ.get("GPT_FINETUNE_MALLOC"))
    if kind.startswith("ours") or kind == "trl-ga-fastmalloc":
        env.update(allocator_env(env, choice))
    return env


def split_kind(name: str) -> tuple[str, int]:
    kind, _, seed = name.partition("#")
    if kind not in RUNS:
        raise SystemExit(f"unknown run {name!r}; choose from {', '.join(RUNS)} (optionally with #SEED)")
    return kind, int(seed or 0)


def label(name: str) -> str:
    kind, seed = split_kind(name)
    return RUNS[kind] + (f", seed {seed}" if "#" in name else "")


def run(name: str, model_dir: str, train_file: str, out: str, args: argparse.Namespace) -> dict:
    kind, seed = split_kind(name)
    stop, peak = peak_rss_sampler()
    extra: dict = {}
    if kind.startswith("ours"):
        from gpt_finetune.local.trainer import Hooks, TrainSpec, train
        from gpt_finetune.worker.allocator import prepare_process

        spec = TrainSpec(
            model_dir=model_dir,
            training_file=train_file,
            validation_file=None,
            output_dir=out + "/ckpt",
            final_dir=out + "/adapter",
            n_epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=seed,
            log_every_steps=10,
            max_steps=args.max_steps,
            max_length=args.max_length,
            gradient_checkpointing=True if kind == "ours-gc" else None,
            **({"lora": ALL_LINEAR} if kind == "ours-al" else {}),
            torch_compile=kind == "ours-compile",
            allocator=prepare_process()[0],  # as a job's process does (glibc's heap limit when no tcmalloc)
        )
        t = time.perf_counter()
        result = train(spec, Hooks())
        seconds = time.perf_counter() - t
        steps, seen = result.global_step, result.tokens_seen
        extra["plan"] = result.plan
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        if kind in ("plain", "plain-fp32"):
            rows = [json.loads(line) for line in open(train_file, encoding="utf-8")]
        else:  # "masked": TRL defaults, but given our assistant-only labels (isolates the loss mask's share)
            from transformers import AutoTokenizer

            from gpt_finetune.local.chat_data import tokenize_file

            rows = tokenize_file(AutoTokenizer.from_pretrained(model_dir), train_file, args.max_length).rows
        per_device, accumulate = args.batch_size, 1
        if kind.startswith("trl-ga"):
            per_device, accumulate = 1, args.batch_size
        config = SFTConfig(
            output_dir=out + "/ckpt",
            num_train_epochs=args.epochs,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulate,
            learning_rate=args.lr,
            seed=seed,
            report_to="none",
            use_cpu=not _cuda(),
            save_strategy="no",
            logging_steps=10,
            disable_tqdm=True,
            max_steps=args.max_steps or -1,
            # TRL's SFTConfig turns bf16 on by default; on a CPU without native bf16 (AVX2 only)
            # autocast emulates it. The "-fp32" runs isolate what that one default costs.
            **({"bf16": False} if kind.endswith("-fp32") or kind.startswith("trl-") else {}),
            # padding-free TRL refuses a max_length it cannot enforce; the rows are already fitted to it
            **({"max_length": None if kind == "trl-pf" else args.max_length} if kind.startswith("trl-") else {}),
            **({"padding_free": True} if kind == "trl-pf" else {}),
        )
        trainer = SFTTrainer(
            model=model_dir, args=config, train_dataset=Dataset.from_list(rows), peft_config=LoraConfig(**LORA)
        )
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
        steps, seen = trainer.state.global_step, int(trainer._total_train_tokens)
        trainer.model.save_pretrained(out + "/adapter")
    stop.set()
    from gpt_finetune.worker.allocator import allocator_in_use

    extra["allocator"] = allocator_in_use()
    return {"seconds": seconds, "steps": steps, "tokens": seen, "peak_rss_mb": peak[0] / 1e6, **extra}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def count_tokens(model_dir: str, train_file: str) -> int:
    from transformers import AutoTokenizer

    from gpt_finetune.local.chat_data import tokenize_file

    tok = AutoTokenizer.from_pretrained(model_dir)
    return sum(len(r["input_ids"]) for r in tokenize_file(tok, train_file, 2048).rows)


def evaluate(model_dir: str, adapters: dict[str, str | None], valid_file: str) -> dict[str, list[tuple[float, int]]]:
    """Per validation example, (summed loss, count) over assistant tokens, for each adapter: one evaluator."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_finetune.local.chat_data import tokenize_file

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenize_file(tok, valid_file, 2048).rows
    out = {}
    for name, path in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model = (PeftModel.from_pretrained(model, path) if path else model).eval()
        out[name] = per_example = []
        with torch.no_grad():
            for r in rows:
                ids = torch.tensor([r["input_ids"]])
                labels = torch.tensor([r["labels"]])
                logits = model(input_ids=ids).logits[0, :-1]
                target = labels[0, 1:]
                mask = target != -100
                loss = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
                per_example.append((loss, int(mask.sum())))
    return out


def mean_loss(per_example: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in per_example) / sum(n for _, n in per_example)


def paired_interval(a: list[tuple[float, int]], b: list[tuple[float, int]], draws: int = 5000) -> tuple[float, float]:
    """95 % bootstrap interval of mean_loss(a) - mean_loss(b), resampling validation examples (paired)."""
    import numpy as np

    sa, na = np.array(a).T
    sb, nb = np.array(b).T
    idx = np.random.default_rng(0).integers(0, len(a), size=(draws, len(a)))
    diff = sa[idx].sum(1) / na[idx].sum(1) - sb[idx].sum(1) / nb[idx].sum(1)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=0, help="stop every run after this many steps (0: all epochs)")
    ap.add_argument("--runs", default="plain,masked,ours", help="which runs, in order")
    ap.add_argument("--data", default=str(ROOT / "examples" / "issues.json"), help="raw data (seed JSON)")
    ap.add_argument("--sys-prompt", default=None, help="default: examples/data_process.cfg's")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--workdir", help="work directory (default: a new temporary one); its prepared data is reused")
    ap.add_argument(
        "--reuse", help="a JSON of finished runs (bench/out/train_bench.partial.json) whose adapters are in --workdir"
    )
    ap.add_argument("--child", nargs=4, metavar=("KIND", "MODEL_DIR", "TRAIN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, model_dir, train_file, out = args.child
        print(json.dumps(run(kind, model_dir, train_file, out, args)))
        return

    from gpt_finetune.data.convert import ConvertOptions
    from gpt_finetune.data.prepare import prepare
    from gpt_finetune.home import Home
    from gpt_finetune.local.base_weights import model_dir as base_dir
    from gpt_finetune.local.base_weights import resolve_base
    from gpt_finetune.settings import load_settings

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_settings({}, config_file=ROOT / "examples" / "data_process.cfg", env={}, default_config=work / "x")
    if not (work / "train.jsonl").is_file():
        prepare(
            Path(args.data),
            work / "train.jsonl",
            split=0.1 if args.data.endswith("examples/issues.json") else 0.2,
            seed=0,
            options=ConvertOptions(sys_prompt=args.sys_prompt or cfg.sys_prompt, task_type="classification"),
        )
    model_dir = base_dir(resolve_base(args.model), Home())
    tokens = count_tokens(model_dir, str(work / "train.jsonl")) * args.epochs
    results = {}
    reused = json.loads(Path(args.reuse).read_text())["runs"] if args.reuse else {}
    for kind in args.runs.split(","):
        if kind in reused and (work / kind / "adapter").is_dir():
            results[kind] = reused[kind]  # trained earlier in this work directory: evaluated below
            continue
        cmd = [
            sys.executable,
            __file__,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--max-steps",
            str(args.max_steps),
            "--max-length",
            str(args.max_length),
            "--child",
            kind,
            model_dir,
            str(work / "train.jsonl"),
            str(work / kind),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(kind))
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        results[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{kind}: {results[kind]}", file=sys.stderr, flush=True)
        (HERE / "out").mkdir(exist_ok=True)
        (HERE / "out" / "train_bench.partial.json").write_text(json.dumps({"args": vars(args), "runs": results}))
    adapters: dict[str, str | None] = {"base": None} | {k: str(work / k / "adapter") for k in results}
    losses = evaluate(model_dir, adapters, str(work / "train.valid.jsonl"))
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "train_bench.json").write_text(json.dumps({"args": vars(args), "runs": results, "eval": losses}))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(
        f"{args.model}, LoRA r8 q/k/v/o, {args.epochs} epoch(s)"
        + (f" capped at {args.max_steps} steps" if args.max_steps else "")
        + f", batch {args.batch_size}, lr {args.lr}; {tokens:,} real tokens per epoch; {device}; "
        + f"base model's valid loss {mean_loss(losses['base']):.3f}\n"
    )
    print(
        "| run | steps | real tokens | train time | real tokens/s | speed-up | peak RSS "
        "| valid loss (assistant tokens) | minus ours, 95 % interval | planned peak |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rate = {k: r["tokens"] / r["seconds"] for k, r in results.items()}
    first = "plain" if "plain" in results else next(iter(results))  # speed-ups: relative to plain TRL
    for name, r in results.items():
        vs = ""
        if "ours" in results and name != "ours":
            lo, hi = paired_interval(losses[name], losses["ours"])
            vs = f"{mean_loss(losses[name]) - mean_loss(losses['ours']):+.3f} ({lo:+.3f} to {hi:+.3f})"
        print(
            f"| {label(name)}{f' ({a} allocator)' if (a := r.get('allocator')) else ''} | {r['steps']} | {r['tokens']:,} | {r['seconds']:.0f} s | {rate[name]:,.1f} | "
            f"{rate[name] / rate[first]:.2f}x | {r['peak_rss_mb']:,.0f} MB | {mean_loss(losses[name]):.3f} | {vs} | "
            + (f"{r['plan']['estimated_peak_bytes'] / 1e6:,.0f} MB |" if r.get("plan") else "|")
        )


if __name__ == "__main__":
    main()
