"""An exported model in a real runtime: llama.cpp (through llama-cpp-python) against this
project's engine, on held-out real issues.

    pip install llama-cpp-python==0.3.36        # builds llama.cpp once (about 10 min on 2 cores)
    python bench/export_bench.py --data ../shared/data/nlbse24_sample.json --workdir DIR \
        [--model ft:...] [--n-epochs 1] [--max-length 512] [--max-tokens 16]

Through the real console script: ``prepare --split 0.2 --seed 0`` (the 60 held-out issues are
never trained on), a fine-tuning job on the default model unless ``--model`` names one (its
defaults; ``--n-epochs`` and ``--max-length`` keep it to minutes), then ``models export`` as
``gguf`` f32 and q8_0, and as ``adapter`` beside the base model's own f32 GGUF export. Each
held-out issue is shortened once as the engine shortens prompts for this model (``fit_messages``
to its training ``max_length``), so every runtime sees the same messages; each answers greedily
(temperature 0, ``--max-tokens``), one request at a time on 2 threads: this project's engine
(``chat`` on the local backend, the model as ``infer`` serves it), and llama.cpp on each file
(its chat template from the GGUF's metadata). Reported: how often each llama.cpp answer is the
engine's, word for word (with a Wilson interval), and generated tokens per second of each.
Raw results go to DIR/export_bench.json; a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYS = "Label the GitHub issue as bug, feature or question."


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--model", help="an existing fine-tuned model of the workdir's data directory")
    ap.add_argument("--n-epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    env = dict(os.environ, GPT_FINETUNE_HOME=str(home))
    cli = [sys.executable, "-m", "gpt_finetune"]
    times: dict[str, float] = {}

    def run(step: str, *argv: str) -> str:
        print(f"$ gpt-finetune {' '.join(argv)}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        done = subprocess.run([*cli, *argv], env=env, stdout=subprocess.PIPE, text=True)
        times[step] = times.get(step, 0.0) + time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"{step} failed (exit {done.returncode})")
        return done.stdout

    train, valid = work / "issues.jsonl", work / "issues.valid.jsonl"
    if not valid.is_file():
        run("prepare", "prepare", "-i", str(args.data), "-o", str(train), "--task-type", "classification",
            "--sys-prompt", SYS, "--split", "0.2", "--seed", "0")  # fmt: skip
    model_file = work / "model.txt"
    model = args.model or (model_file.read_text().strip() if model_file.is_file() else None)
    if model is None:
        job = run("train", "finetune", "-d", str(train), "-m", "SmolLM2-135M-Instruct", "--backend", "local",
                  "--n-epochs", str(args.n_epochs), "--max-length", str(args.max_length), "--suffix", "export",
                  "--seed", "0").strip().splitlines()[-1]  # fmt: skip
        run("train", "jobs", "wait", job, "--backend", "local")
        got = json.loads(run("train", "jobs", "get", job, "--backend", "local", "--json"))
        model = got["fine_tuned_model"]
        model_file.write_text(model)
    assert model is not None
    out = {}
    for name, extra in (
        ("f32", ["--format", "gguf", "--dtype", "f32"]),
        ("q8_0", ["--format", "gguf", "--dtype", "q8_0"]),
        ("adapter", ["--format", "adapter"]),
    ):
        out[name] = work / f"export-{name}"
        if not out[name].is_dir():
            run(f"export {name}", "models", "export", model, "-o", str(out[name]), *extra, "--backend", "local")
    out["base"] = work / "export-base-f32"
    if not out["base"].is_dir():
        run("export base", "models", "export", "SmolLM2-135M-Instruct", "-o", str(out["base"]), "--format", "gguf",
            "--dtype", "f32", "--backend", "local")  # fmt: skip

    # the same messages for every runtime: each issue shortened once, as the engine does for this model
    os.environ["GPT_FINETUNE_HOME"] = str(home)
    from gpt_finetune.backends.local import LocalBackend, export_source
    from gpt_finetune.local.chat_data import fit_messages
    from gpt_finetune.services import Services

    services = Services.open(home)
    source = export_source(services, model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.base_dir)
    limit = max((source.max_length or 2048) - args.max_tokens, (source.max_length or 2048) // 2)
    prompts = []
    for line in valid.read_text(encoding="utf-8").splitlines():
        messages = [m for m in json.loads(line)["messages"] if m["role"] != "assistant"]
        fitted = fit_messages(tok, messages, limit, add_generation_prompt=True)
        assert fitted is not None
        prompts.append(fitted[0])
    print(f"{len(prompts)} held-out issues, prompts up to {limit} tokens", file=sys.stderr)

    results: dict[str, Any] = {"model": model, "n": len(prompts), "times": times, "runtimes": {}}

    def record(name: str, answers: list[str], seconds: float, tokens: int) -> None:
        results["runtimes"][name] = {"answers": answers, "seconds": seconds, "completion_tokens": tokens}
        print(f"{name}: {tokens} tokens in {seconds:.1f} s", file=sys.stderr, flush=True)

    backend = LocalBackend(services)
    backend.chat(model=model, messages=prompts[0], max_tokens=2, temperature=0)  # loaded once, not timed
    answers, tokens, t = [], 0, time.perf_counter()
    for m in prompts:
        r = backend.chat(model=model, messages=m, max_tokens=args.max_tokens, temperature=0)
        answers.append(r.choices[0].message.content or "")
        tokens += r.usage.completion_tokens if r.usage else 0
    record("engine", answers, time.perf_counter() - t, tokens)

    from llama_cpp import Llama

    files = {
        "llama.cpp f32": (next(out["f32"].glob("*.gguf")), None),
        "llama.cpp q8_0": (next(out["q8_0"].glob("*.gguf")), None),
        "llama.cpp base f32 + --lora": (next(out["base"].glob("*.gguf")), next(out["adapter"].glob("*.gguf"))),
    }
    for name, (path, lora) in files.items():
        llm = Llama(
            model_path=str(path),
            lora_path=str(lora) if lora else None,
            n_ctx=limit + args.max_tokens + 64,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
            seed=0,
        )
        llm.create_chat_completion(messages=prompts[0], max_tokens=2, temperature=0)
        answers, tokens, t = [], 0, time.perf_counter()
        for m in prompts:
            r: Any = llm.create_chat_completion(messages=m, max_tokens=args.max_tokens, temperature=0)
            answers.append(r["choices"][0]["message"]["content"] or "")
            tokens += r["usage"]["completion_tokens"]
        record(name, answers, time.perf_counter() - t, tokens)
        del llm

    engine = results["runtimes"]["engine"]["answers"]
    print(f"\nModel `{model}`, {len(prompts)} held-out issues, greedy, {args.max_tokens} tokens at most\n")
    print("| runtime | same answer as the engine (95% interval) | seconds (all answers) | generated tokens/s |")
    print("|---|---|---:|---:|")
    for name, r in results["runtimes"].items():
        same = sum(a.strip() == b.strip() for a, b in zip(r["answers"], engine))
        lo, hi = wilson(same, len(engine))
        r["agreement"] = same / len(engine)
        rate = r["completion_tokens"] / r["seconds"]
        shown = "-" if name == "engine" else f"{same}/{len(engine)} = {same / len(engine):.3f} [{lo:.3f}, {hi:.3f}]"
        print(f"| {name} | {shown} | {r['seconds']:.1f} | {rate:.1f} |")
    (work / "export_bench.json").write_text(json.dumps(results, indent=1))
    print("\nsteps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
