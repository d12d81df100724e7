"""The engine on your GPU: training tokens/s and MFU beside TRL's SFTTrainer, and serving throughput.

    python bench/gpu_bench.py                                  # the default model, on this machine's device
    python bench/gpu_bench.py --model DIR                      # any local Hugging Face model directory
    python bench/gpu_bench.py --random                         # the default model's architecture, random weights
    python bench/gpu_bench.py --runs ours-lora,trl-lora-tuned --clients 16
    python bench/gpu_bench.py --tiny --steps 3 --batch 4 --clients 1,4 --serve-tokens 8   # the script's own check, CPU

One command a user runs on their GPU (README "GPUs"). Training: every run trains the same
``--steps`` optimizer steps of ``--batch`` examples (one epoch over exactly that many, so every
run sees the same examples), each in a fresh process:

- ``ours-full`` / ``ours-lora``: this project's trainer as a job runs it (``local/trainer.py``:
  packed padding-free micro-batches sized by the memory plan, the precision and attention of
  ``local/device.py``, loss over the answers only; LoRA r 16 on every linear layer, the
  classification default).
- ``trl-{full,lora}-defaults``: TRL's ``SFTTrainer`` given the same chat rows and nothing else
  but the batch size's default (8 a device), as its quick start shows.
- ``trl-{full,lora}-tuned``: what a TRL user tuning for speed would set: ``--batch`` a device,
  ``padding_free`` with flash-attention where installed (else bf16 SDPA with padding),
  activation checkpointing off, ``assistant_only_loss`` off (the template has no generation
  marks), two loader processes.

Reported per run: real (non-padding) tokens per second over the whole ``trainer.train()``,
MFU, and peak memory (the GPU's ``max_memory_allocated``, or the process's RSS on a CPU) beside
the memory plan's estimate for ours. MFU counts 6N FLOPs a token for full training and 4N for
LoRA (frozen weights get no weight gradients), N the parameters that take part in matmuls (the
LM head included, counted once more when tied to the embedding), plus causal attention's
6 x layers x hidden x T, T the mean example length; against the device's dense bf16 peak
(``PEAK_TFLOPS`` by name, or ``--peak-tflops``; none on a CPU).

Serving: the engine (``local/inference.py``) in one process, closed-loop clients at each of
``--clients``, each request a real issue under a summarising system prompt with
``--serve-tokens`` to generate, over the continuous batching (up to the largest client count in
one batch) and over the same engine one request at a time (``--max-batch 1``): aggregate output
tokens per second and p50/p95 latency.

Data: the real issue sample (``../shared/data/nlbse24_sample.json``) when present, else the
project's own examples, so lengths follow real issues; rows are repeated to fill the steps.
Without the default model's weights (``--random``, or when they cannot be had), the same
architecture with random weights and the real tokenizer: speed does not depend on the weights.
Results: a Markdown table on stdout, the raw figures in ``--out`` (bench/out/gpu_bench.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
SAMPLE = ROOT.parent / "shared" / "data" / "nlbse24_sample.json"
BUNDLED = ROOT / "examples" / "issues.json"
SYSTEM = "Label the GitHub issue as bug, feature or question."
SERVE_SYSTEM = "Summarise the GitHub issue for a maintainer in a few sentences."

RUNS = {
    "ours-full": "gpt-finetune trainer, full fine-tuning",
    "ours-lora": "gpt-finetune trainer, LoRA r 16 on every linear layer",
    "trl-full-defaults": "TRL SFTTrainer, defaults, full fine-tuning",
    "trl-full-tuned": "TRL SFTTrainer, tuned for speed, full fine-tuning",
    "trl-lora-defaults": "TRL SFTTrainer, defaults, LoRA r 16 on every linear layer",
    "trl-lora-tuned": "TRL SFTTrainer, tuned for speed, LoRA r 16 on every linear layer",
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["all-linear"]}
# dense bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the first name contained wins
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]


# ---- the model and the data ---------------------------------------------------------------------
def model_for(args: argparse.Namespace, work: Path) -> str:
    """The model directory every run loads: a user's, the default converted, or random weights
    of the default model's architecture (``--tiny``: a two-layer one) with the real tokenizer."""
    if args.model:
        return str(args.model)
    from gpt_finetune.home import Home
    from gpt_finetune.local.base_weights import DEFAULT_BASE_MODEL, model_dir, resolve_base, tokenizer_dir

    home = Home()
    base = resolve_base(DEFAULT_BASE_MODEL)
    if not args.random and not args.tiny:
        return model_dir(base, home)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(args.tokenizer or tokenizer_dir(base, home))
    shape = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if args.tiny
        else dict(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
        )
    )  # fmt: skip  (the second: SmolLM2-135M's)
    config = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape,
    )  # fmt: skip
    out = work / ("tiny" if args.tiny else "random")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def training_file(args: argparse.Namespace, work: Path) -> tuple[Path, list[list[dict[str, str]]]]:
    """``steps x batch`` chat examples from real issues (repeated in order), and serving prompts."""
    from gpt_finetune.data.convert import ConvertOptions
    from gpt_finetune.data.prepare import prepare

    source = args.data or (SAMPLE if SAMPLE.is_file() else BUNDLED)
    prepared = work / "prepared.jsonl"
    prepare(source, prepared, options=ConvertOptions(sys_prompt=SYSTEM, task_type="classification"))
    rows = [json.loads(line) for line in prepared.read_text(encoding="utf-8").splitlines() if line.strip()]
    need = args.steps * args.batch
    chosen = [rows[i % len(rows)] for i in range(need)]
    out = work / "train.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
    prompts = [
        [{"role": "system", "content": SERVE_SYSTEM}, next(m for m in r["messages"] if m["role"] == "user")]
        for r in rows
    ]
    return out, prompts


# ---- one training run (a child process) ---------------------------------------------------------
def train_run(name: str, model: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gpt_finetune.local import device

    dev = device.facts()
    cuda = dev.kind == "cuda"
    lora = name.endswith("lora") or "-lora-" in name
    stop, peak = _rss_sampler()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    extra: dict[str, Any] = {}
    if name.startswith("ours"):
        from gpt_finetune.local.trainer import Hooks, TrainSpec, train
        from gpt_finetune.worker.allocator import prepare_process

        spec = TrainSpec(
            model_dir=model, training_file=str(data), validation_file=None,
            output_dir=str(out / "ckpt"), final_dir=str(out / "final"), n_epochs=1,
            batch_size=args.batch, learning_rate=1e-4 if not lora else 1e-3, seed=0,
            training_type="lora" if lora else "full", lora=LORA, max_length=args.max_length,
            log_every_steps=max(1, args.steps // 5), allocator=prepare_process()[0],
            memory_limit_gb=args.memory_limit_gb,
        )  # fmt: skip
        messages: list[str] = []
        t0 = time.perf_counter()
        result = train(spec, Hooks(on_message=messages.append))
        seconds = time.perf_counter() - t0
        tokens, steps = result.tokens_seen, result.global_step
        extra["plan_peak_gb"] = (result.plan or {}).get("estimated_peak_bytes", 0) / 1e9
        extra["events"] = messages[:3]
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
        tuned = name.endswith("tuned")
        flash = cuda and device.attention(dev) == device.FLASH_ATTENTION
        settings: dict[str, Any] = {}
        if tuned:
            settings = dict(
                per_device_train_batch_size=args.batch,
                max_length=args.max_length,
                padding_free=flash,  # TRL's padding-free needs flash-attention to keep examples apart
                model_init_kwargs={"attn_implementation": "flash_attention_2" if flash else "sdpa"},
                dataloader_num_workers=device.loader_workers(dev),
                **_no_checkpointing(SFTConfig),
            )
        if not cuda:
            settings["use_cpu"] = True
            settings["bf16"] = False  # bf16 autocast on a CPU is emulated: not what anyone would run
        config = SFTConfig(
            output_dir=str(out / "ckpt"), max_steps=args.steps, learning_rate=1e-4 if not lora else 1e-3,
            report_to="none", save_strategy="no", logging_steps=max(1, args.steps // 5), disable_tqdm=True,
            seed=0, **settings,
        )  # fmt: skip
        peft_config = None
        if lora:
            peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), peft_config=peft_config)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        tokens, steps = int(trainer._total_train_tokens), trainer.state.global_step
        extra["settings"] = {k: v for k, v in settings.items() if k != "model_init_kwargs"}
    stop.set()
    peak_bytes = torch.cuda.max_memory_allocated() if cuda else peak[0]
    return {
        "run": name, "seconds": seconds, "tokens": tokens, "steps": steps, "tokens_per_s": tokens / seconds,
        "peak_gb": peak_bytes / 1e9, "peak_kind": "GPU allocated" if cuda else "RSS", "lora": lora,
        "device": dev.describe(), **extra,
    }  # fmt: skip


def _no_checkpointing(config_class: Any) -> dict[str, bool]:
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def _rss_sampler() -> tuple[threading.Event, list[int]]:
    import psutil

    stop, peak, proc = threading.Event(), [0], psutil.Process()

    def loop() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=loop, daemon=True).start()
    return stop, peak


# ---- serving (a child process) ------------------------------------------------------------------
def serve_run(model: str, prompts: list[list[dict[str, str]]], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from gpt_finetune.home import Home
    from gpt_finetune.local.inference import Engine

    levels = [int(c) for c in args.clients.split(",")]
    out: dict[str, Any] = {}
    for label, max_batch in (("batched", max(levels)), ("one at a time", 1)):
        engine = Engine(Home(work / f"home-{max_batch}"), max_queue=4 * max(levels), max_batch=max_batch)
        engine.complete(model, None, prompts[0], max_tokens=2, temperature=0)  # load and warm up
        for clients in levels:
            if max_batch == 1 and clients > args.one_at_a_time_max:
                continue
            out[f"{label}/{clients}"] = {"engine": label, **_level(engine, model, prompts, clients, args)}
            print(
                f"  serve {label}, {clients} clients: {out[f'{label}/{clients}']['tokens_per_s']:.1f} tok/s", flush=True
            )
    return out


def _level(engine: Any, model: str, prompts: list[Any], clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """``clients`` closed-loop clients, ``--requests-per-client`` requests each, all greedy."""
    from gpt_finetune.local.inference import ChoiceEnd, GenRequest, Usage

    engine.peak_batch = 0  # this level's largest batch, not an earlier one's
    todo = list(range(clients * args.requests_per_client))
    latencies: list[float] = []
    generated = [0]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                k = todo.pop()
            t0 = time.perf_counter()
            request = GenRequest(model, None, prompts[k % len(prompts)], max_tokens=args.serve_tokens, temperature=0)
            events = engine.run(request)
            assert any(isinstance(e, ChoiceEnd) for e in events)
            usage = next(e for e in events if isinstance(e, Usage))
            with lock:
                latencies.append(time.perf_counter() - t0)
                generated[0] += usage.completion_tokens

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [latencies[0]] * 19
    return {
        "clients": clients, "requests": len(latencies), "wall_s": wall, "tokens_per_s": generated[0] / wall,
        "latency_p50": statistics.median(latencies), "latency_p95": q[18], "peak_batch": engine.peak_batch,
    }  # fmt: skip


# ---- the report ---------------------------------------------------------------------------------
def matmul_params(model: str) -> tuple[int, int, int]:
    """(parameters in matmuls, layers, hidden size) of the model, from its config and weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in m.parameters())
    embedding = m.get_input_embeddings().weight.numel()
    head = embedding  # the LM head is a matmul whether or not it shares the embedding's weights
    untied = not getattr(config, "tie_word_embeddings", False)
    return total - embedding - (head if untied else 0) + head, config.num_hidden_layers, config.hidden_size


def peak_flops(device_text: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not device_text.startswith("cuda"):
        return None
    for name, tflops in PEAK_TFLOPS:
        if name in device_text:
            return tflops * 1e12
    return None


def mean_length(model: str, data: Path, max_length: int) -> float:
    from transformers import AutoTokenizer

    from gpt_finetune.local.chat_data import tokenize_file

    rows = tokenize_file(AutoTokenizer.from_pretrained(model), str(data), max_length).rows
    return sum(len(r["input_ids"]) for r in rows) / max(1, len(rows))


def report(results: dict[str, Any], model: str, data: Path, args: argparse.Namespace) -> str:
    n, layers, hidden = matmul_params(model)
    t_mean = mean_length(model, data, args.max_length)
    where = next((r["device"] for name, r in results.items() if name != "serve"), "")
    lines = [
        f"Training: {args.steps} steps of {args.batch} examples (mean {t_mean:.0f} tokens, max_length "
        f"{args.max_length}), {n / 1e6:.1f} M parameters in matmuls, on {where}",
        "",
        "| run | real tokens/s | MFU | peak memory | plan's estimate | seconds | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if name == "serve":
            continue
        per_token = (4 if r["lora"] else 6) * n + 6 * layers * hidden * t_mean
        peak = peak_flops(r["device"], args.peak_tflops)
        mfu = f"{r['tokens_per_s'] * per_token / peak:.1%}" if peak else "-"
        plan = f"{r['plan_peak_gb']:.2f} GB" if r.get("plan_peak_gb") else ""
        lines.append(
            f"| {name}: {RUNS[name]} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gb']:.2f} GB ({r['peak_kind']}) | "
            f"{plan} | {r['seconds']:.1f} | {r['tokens']:,} |"
        )
    if "serve" in results:
        lines += [
            "",
            f"Serving: {args.serve_tokens} tokens to generate a request, {args.requests_per_client} requests a client",
            "",
            "| engine | clients | requests | output tokens/s | latency p50 s | latency p95 s | largest batch |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["serve"].values():
            lines.append(
                f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                f"{r['latency_p50']:.2f} | {r['latency_p95']:.2f} | {r['peak_batch']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a local model directory (default: the default model)")
    ap.add_argument("--random", action="store_true", help="the default model's architecture with random weights")
    ap.add_argument("--tiny", action="store_true", help="a two-layer model of the same family (the script's own check)")
    ap.add_argument(
        "--tokenizer", type=Path, help="with --random: a saved tokenizer (default: the default model's GGUF)"
    )
    ap.add_argument("--data", type=Path, help="issues in a format prepare reads (default: the real sample)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated; see RUNS")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32, help="examples a step (ours: OpenAI's batch_size)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument(
        "--memory-limit-gb", type=float, default=None, help="ours: the plan's target (default: the device's)"
    )
    ap.add_argument("--clients", default="1,16,64", help="serving levels; empty: no serving")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--serve-tokens", type=int, default=128)
    ap.add_argument("--one-at-a-time-max", type=int, default=16, help="the batching-off baseline's largest level")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when not in PEAK_TFLOPS")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "gpu_bench.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one run in a fresh process; its figures as JSON on the last line
        work = args.work
        model = (work / "model.txt").read_text()
        data = work / "train.jsonl"
        if args.child == "serve":
            prompts = json.loads((work / "prompts.json").read_text())
            result: Any = serve_run(model, prompts, args, work)
        else:
            result = train_run(args.child, model, data, work / args.child, args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        if r not in RUNS:
            raise SystemExit(f"unknown run {r!r}; choose from {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory(prefix="gpu_bench-") as tmp:
        work = Path(tmp)
        model = model_for(args, work)
        (work / "model.txt").write_text(model)
        data, prompts = training_file(args, work)
        (work / "prompts.json").write_text(json.dumps(prompts))
        results: dict[str, Any] = {}
        children = [*runs, *(["serve"] if args.clients else [])]
        for name in children:
            print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
            cmd = [sys.executable, __file__, "--child", name, "--work", str(work), *_passed(args)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
                print(f"  {name} failed (exit {proc.returncode}):\n{tail}", flush=True)
                continue
            results[name] = json.loads(found[-1][len("RESULT ") :])
            if name != "serve":
                print(f"  {results[name]['tokens_per_s']:,.0f} real tokens/s", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))  # after every run: a stopped bench keeps its figures
        if not results:
            raise SystemExit("no run finished")
        print(report(results, model, data, args))


def _passed(args: argparse.Namespace) -> list[str]:
    """The options a child needs, as given to the parent."""
    out = ["--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)]
    out += ["--clients", args.clients, "--requests-per-client", str(args.requests_per_client)]
    out += ["--serve-tokens", str(args.serve_tokens), "--one-at-a-time-max", str(args.one_at_a_time_max)]
    if args.memory_limit_gb:
        out += ["--memory-limit-gb", str(args.memory_limit_gb)]
    return out


if __name__ == "__main__":
    main()
