"""The baseline: the same jobs done the way OpenAI's cookbook data-prep notebook does them.

Every line is loaded into a list first, then checked and counted in one process. This file is
the measuring stick for bench/data_bench.py; it is not part of the package.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np

from gpt_finetune.data.tokens import get_encoding


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def format_errors(dataset):
    errors = defaultdict(int)
    for ex in dataset:
        if not isinstance(ex, dict):
            errors["data_type"] += 1
            continue
        messages = ex.get("messages", None)
        if not messages:
            errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                errors["message_missing_key"] += 1
            if any(k not in ("role", "content", "name", "function_call", "weight") for k in message):
                errors["message_unrecognized_key"] += 1
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                errors["unrecognized_role"] += 1
            content = message.get("content", None)
            function_call = message.get("function_call", None)
            if (not content and not function_call) or not isinstance(content, str):
                errors["missing_content"] += 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            errors["example_missing_assistant_message"] += 1
    return errors


def num_tokens_from_messages(messages, enc, tokens_per_message=3, tokens_per_name=1):
    n = 0
    for message in messages:
        n += tokens_per_message
        for key, value in message.items():
            n += len(enc.encode_ordinary(value))
            if key == "name":
                n += tokens_per_name
    return n + 3


def validate(path):
    """The notebook's checks: format errors, then token counts against the model's limit."""
    dataset = load(path)
    enc = get_encoding("cl100k_base")
    errors = format_errors(dataset)
    counts = [num_tokens_from_messages(ex["messages"], enc) for ex in dataset]
    n_too_long = sum(c > 16385 for c in counts)
    return len(dataset), dict(errors), n_too_long


def stats(path):
    dataset = load(path)
    enc = get_encoding("cl100k_base")
    errors = format_errors(dataset)
    counts = [num_tokens_from_messages(ex["messages"], enc) for ex in dataset]
    n_messages = [len(ex["messages"]) for ex in dataset]
    arr = np.array(counts)
    return len(dataset), dict(errors), int(arr.sum()), float(np.percentile(arr, 95)), max(n_messages)


def prepare(src, dst, sys_prompt="You label issues."):
    roles = {"human": "user", "gpt": "assistant"}
    with open(src, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    out = []
    for r in records:
        msgs = [{"role": "system", "content": sys_prompt}]
        msgs += [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]
        out.append({"messages": msgs})
    with open(dst, "w", encoding="utf-8") as f:
        for ex in out:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    return len(out)


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    print({"validate": validate, "stats": stats, "prepare": prepare}[job](*args))
