"""The whole move off OpenAI, end to end, on real GitHub issues, against a fake OpenAI.

    python bench/migrate_bench.py --data ../shared/data/nlbse24_sample.json --flip 0.15

The fake organisation (tests/fake_org.py, served on a loopback port) holds one succeeded
gpt-4o-mini job whose training and validation files OpenAI refuses to serve, as it does for files
uploaded for fine-tuning; the user has their own copies (``--data``). Its "old model" answers each
issue with its reference label, except a stated share (``--flip``, chosen by a hash of the
prompt) answered with another label, so what it scores is known. Usage is counted with o200k, the
encoding gpt-4o-mini bills. Then, through the real console script as a user runs it:

    migrate inventory -o DIR --data WORK     (the refused files matched to the user's copies)
    migrate record DIR --concurrency 8       (the validation file's prompts)
    migrate retrain DIR --wait               (the local default model, OpenAI's hyperparameters)
    migrate compare DIR                      (against the recordings and the references)
    migrate status DIR

and prints each step's time and the comparison. The local job trains for ``--n-epochs``
(OpenAI's resolved value in the fake job; 3 as OpenAI's default gives for 240 examples).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

LABELS = ["bug", "feature", "question"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the seed-format issue sample")
    ap.add_argument("--flip", type=float, default=0.15, help="share of the old model's answers that are wrong")
    ap.add_argument("--n-epochs", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "migrate"))
    args = ap.parse_args()
    from fake_org import KEY, FakeOrg

    from gpt_finetune.data.tokens import count_message_tokens, get_encoding

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    env = dict(os.environ, GPT_FINETUNE_HOME=str(home), OPENAI_API_KEY=KEY, PYTHONPATH=str(ROOT / "src"))
    cli = [sys.executable, "-m", "gpt_finetune"]
    times: dict[str, float] = {}

    def run(step: str, *argv: str) -> str:
        print(f"$ gpt-finetune {' '.join(argv)}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        done = subprocess.run([*cli, *argv], env=env, stdout=subprocess.PIPE, text=True)
        times[step] = time.perf_counter() - t
        print(done.stdout, file=sys.stderr)
        if done.returncode != 0 and step != "status":
            raise SystemExit(f"{step} failed (exit {done.returncode})")
        return done.stdout

    train = work / "issues.jsonl"
    if not train.is_file():
        run(
            "prepare",
            "prepare", "-i", args.data, "-o", str(train), "--task-type", "classification",
            "--sys-prompt", "Label the GitHub issue as bug, feature or question.", "--split", "0.2", "--seed", "0",
        )  # fmt: skip
    valid = work / "issues.valid.jsonl"
    org = FakeOrg()
    enc = get_encoding("o200k_base")
    org.usage = lambda messages, text: (count_message_tokens(messages, enc)[0], len(enc.encode_ordinary(text)))
    answers = {}  # the old model's answer to each held-out issue
    for line in valid.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompt, reference = row["messages"][1]["content"], row["messages"][-1]["content"]
        h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
        if (h % 10_000) / 10_000 < args.flip:
            reference = "'" + [x for x in LABELS if x != reference.strip("'")][h % 2] + "'"
        answers[prompt] = reference
    flipped = sum(
        1
        for line in valid.read_text(encoding="utf-8").splitlines()
        if json.loads(line)["messages"][-1]["content"] != answers[json.loads(line)["messages"][1]["content"]]
    )

    def old_model(model: str, messages: list[dict]) -> str:
        return answers[messages[-1]["content"]]

    org.answer = old_model
    job = org.add_job(
        base="gpt-4o-mini-2024-07-18",
        training_file=org.add_file(train.read_bytes(), train.name, refuse=True),
        validation_file=org.add_file(valid.read_bytes(), valid.name, refuse=True),
        suffix="issues",
        n_epochs=args.n_epochs,
        batch_size=8,
        lr=1.0,
        seed=0,
    )
    move = work / "move"
    with org.serve() as url:
        env["OPENAI_BASE_URL"] = url
        run("inventory", "migrate", "inventory", "-o", str(move), "--data", str(train), str(valid))
        run("record", "migrate", "record", str(move), "--concurrency", "8")
    run("retrain", "migrate", "retrain", str(move), "--wait")
    run("compare", "migrate", "compare", str(move))
    run("status", "migrate", "status", str(move))
    result = json.loads((move / "compare" / job["id"] / "compare.json").read_text())
    vs = result["vs_references"]
    d, lo, hi = vs["local_minus_old_macro_f1"]
    print(f"\nOld model: {job['fine_tuned_model']}; {flipped}/{len(answers)} answers flipped (--flip {args.flip})\n")
    print("| step | seconds |\n|---|---:|")
    for step, seconds in times.items():
        print(f"| {step} | {seconds:.1f} |")
    print("\n| | old model (recorded) | local model |\n|---|---:|---:|")
    print(f"| accuracy vs references | {vs['old']['accuracy']:.3f} | {vs['local']['accuracy']:.3f} |")
    print(f"| macro-F1 vs references | {vs['old']['macro_f1']:.3f} | {vs['local']['macro_f1']:.3f} |")
    print(f"\nlocal - old macro-F1: {d:+.3f} (95 % interval {lo:+.3f} to {hi:+.3f})")
    print(f"exact agreement with the old model: {result['exact_agreement']:.3f}; "
          f"label agreement macro-F1 {result['agreement']['macro_f1']:.3f}")  # fmt: skip
    lat = result["latency_s"]
    print(
        f"local latency p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s; {result['local_tokens_per_second']:.1f} tokens/s"
    )
    cost = result["openai_cost"]
    print(f"OpenAI: {cost['prompt_tokens']:,} prompt + {cost['completion_tokens']:,} completion tokens, "
          f"${cost['usd']:.4f} (${cost['usd_per_1000_requests']:.3f} per 1,000 requests)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
