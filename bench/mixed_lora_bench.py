"""One decoding step of 16 rows over several adapters of one base: PEFT's mixed batch
(``adapter_names``) against the engine's two dense matmuls a layer (``local/mixed_lora.py``),
with the base model alone (the model without adapters, the adapters disabled by PEFT, and every
row on the base through the dense path) and one adapter for every row as the floor, in-process on the default
model (README "Serving", bench/README.md "Many clients at once").

    python bench/mixed_lora_bench.py [--rows 16] [--prompt 300] [--adapters 4] [--repeats 20]

Four LoRA adapters (rank 16 on every linear layer, the classification default; random A and B,
so every adapter changes every layer) are attached to the converted default model. Each row has
a KV cache of ``--prompt`` tokens (one prefill, then copied for each timed step, so every step
decodes at the same length); rows take the base model and the adapters in turn. Each variant
runs ``--repeats`` steps, interleaved round-robin with the others so drift hits all alike;
reported: the median and the 10th-90th percentile of a step's milliseconds, and the largest
logit difference of the dense path from PEFT's on the same step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gpt_finetune.base_catalog import resolve_base
    from gpt_finetune.home import Home
    from gpt_finetune.local import mixed_lora
    from gpt_finetune.local.base_weights import model_dir

    torch.manual_seed(0)
    path = model_dir(resolve_base("SmolLM2-135M-Instruct"), Home())
    plain = AutoModelForCausalLM.from_pretrained(path).eval()  # the floor: no adapters attached
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    names = [f"a{i}" for i in range(args.adapters)]
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, config, adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, config)
    for module in model.modules():  # B starts at zero in PEFT: give every adapter an effect
        for n in getattr(module, "lora_B", {}):
            torch.nn.init.normal_(module.lora_B[n].weight, std=0.02)
    model.eval()
    rows = [None, *names]
    adapters = [rows[i % len(rows)] for i in range(args.rows)]
    prompt = torch.randint(0, 49152, (args.rows, args.prompt))
    with torch.no_grad(), model.disable_adapter():
        prefill = model(input_ids=prompt, use_cache=True)
    cache = prefill.past_key_values
    token = prefill.logits[:, -1:].argmax(-1)

    def step(kind: str) -> tuple[float, torch.Tensor]:
        past = copy.deepcopy(cache)
        kw = {"input_ids": token, "past_key_values": past, "use_cache": True}
        t0 = time.perf_counter()
        with torch.no_grad():
            if kind == "no adapters attached":
                out = plain(**kw)
            elif kind == "base, disable_adapter":
                with model.disable_adapter():
                    out = model(**kw)
            elif kind == "base, dense path":
                with mixed_lora.mixed_rows(model, [None] * args.rows):
                    out = model(**kw)
            elif kind == "one adapter":
                model.set_adapter(names[0])
                out = model(**kw)
            elif kind == "PEFT mixed":
                out = model(**kw, adapter_names=[a or "__base__" for a in adapters])
            else:
                with mixed_lora.mixed_rows(model, adapters):
                    out = model(**kw)
        return (time.perf_counter() - t0) * 1000, out.logits[:, -1]

    kinds = [
        "no adapters attached", "base, disable_adapter", "base, dense path", "one adapter", "PEFT mixed", "dense mixed",
    ]  # fmt: skip
    assert mixed_lora.supported(model)
    for kind in kinds:  # warm-up (and the dense path's stacked matrices)
        step(kind)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    logits: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for kind in kinds:
            ms, logits[kind] = step(kind)
            times[kind].append(ms)
    diff = float((logits["dense mixed"] - logits["PEFT mixed"]).abs().max())
    base_diff = float((logits["base, dense path"] - logits["base, disable_adapter"]).abs().max())
    print(
        f"{args.rows} rows, a {args.prompt}-token cache each, {args.adapters} adapters + the base, "
        f"{torch.get_num_threads()} threads, {args.repeats} steps each"
    )
    print("| step | median ms | p10-p90 ms |")
    print("|---|---:|---:|")
    for kind in kinds:
        q = statistics.quantiles(times[kind], n=10)
        print(f"| {kind} | {statistics.median(times[kind]):.0f} | {q[0]:.0f}-{q[-1]:.0f} |")
    print(f"largest logit difference, dense against PEFT's mixed step: {diff:.2e}")
    print(f"largest logit difference, base rows on the dense path against disable_adapter: {base_diff:.2e}")


if __name__ == "__main__":
    main()
