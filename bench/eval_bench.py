"""Classification throughput: label-constrained scoring against free generation, same model, same
examples, in one run.

    python bench/eval_bench.py --model MODEL --data valid.jsonl --train train.jsonl [--n 32]

Free generation answers greedily (at most ``--max-tokens``), one prompt at a time (batch 1) and
16 prompts per batch (left-padded, transformers' ``generate``). Constrained scoring runs each
prompt once and all candidate label sets in one batched pass sharing it; it takes one prompt per
call, so "batch 16" is 16 such calls in a row (its speed does not depend on the batch size).
Prints examples per second and the share of answers inside the label set.
"""

from __future__ import annotations

import argparse
import sys
import time

from gpt_finetune.eval import evaluate as ev
from gpt_finetune.services import Services


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--home", default=None)
    args = ap.parse_args()
    from gpt_finetune.backends.local import LocalBackend

    backend = LocalBackend(Services.open(args.home))
    ex = ev.read_examples(args.data, task="classification")
    ex.prompts, ex.references = ex.prompts[: args.n], ex.references[: args.n]
    choices = ev.candidates(ex, ev.read_examples(args.train, task="classification"))
    ev.predict(backend, args.model, ev.Examples(ex.prompts[:1], ex.references[:1], ex.task), max_tokens=2)  # load
    rows = []
    for label, kw in (
        ("free generation, batch 1", {"batch_size": 1, "max_tokens": args.max_tokens}),
        ("free generation, batch 16", {"batch_size": 16, "max_tokens": args.max_tokens}),
        ("label-constrained, batch 1", {"choices": choices}),
        ("label-constrained, batch 16", {"choices": choices, "batch_size": 16}),
    ):
        t = time.perf_counter()
        answers = ev.predict(backend, args.model, ex, **kw)
        seconds = time.perf_counter() - t
        known = set(choices)
        inside = sum(1 for a in answers if a in known) / len(answers)
        rows.append((label, len(answers) / seconds, inside))
        print(f"{label}: {len(answers) / seconds:.2f} examples/s", file=sys.stderr)
    print(f"{args.model} on {len(ex.prompts)} examples of {args.data}; {len(choices)} candidate label sets\n")
    print("| mode | examples/s | answers inside the label set |\n|---|---|---|")
    for label, rate, inside in rows:
        print(f"| {label} | {rate:.2f} | {inside:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
