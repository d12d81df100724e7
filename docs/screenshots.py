"""The dashboard's screenshots in README.md, taken in Debian's chromium against a real server.

    python docs/screenshots.py [--out docs]

A tiny Llama (built from a config, with the default model's tokenizer: no download) trains on
the bundled example issues through the SDK, so the pages show a real job, its curves, its
checkpoints and its model; light and dark pages are written as docs/dashboard-*.png.
The tiny model's free answers are noise; its label-constrained answers are what it learnt.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip


def tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gpt_finetune.home import Home
    from gpt_finetune.local.base_weights import DEFAULT_BASE_MODEL, resolve_base, tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(resolve_base(DEFAULT_BASE_MODEL), Home(out / "cache")))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    path = out / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gf-shots-"))
    os.environ.setdefault("GPT_FINETUNE_MODEL_CACHE", str(work / "cache"))
    model = tiny_model(work)
    gf = [sys.executable, "-m", "gpt_finetune"]
    subprocess.run(
        [
            *gf,
            "prepare",
            "-i",
            str(ROOT / "examples/issues.json"),
            "-o",
            str(work / "issues.jsonl"),
            "--split",
            "0.2",
            "--task-type",
            "classification",
        ],
        check=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, GPT_FINETUNE_LOCAL_BASE_MODEL=str(model), GPT_FINETUNE_LOG_EVERY_STEPS="1")
    server = subprocess.Popen([*gf, "serve", "--home", str(work / "home"), "--port", str(port)], env=env)
    try:
        for _ in range(120):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(api_key="none", base_url=url + "/v1")
        train = client.files.create(file=open(work / "issues.jsonl", "rb"), purpose="fine-tune")
        valid = client.files.create(file=open(work / "issues.valid.jsonl", "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=train.id,
            validation_file=valid.id,
            suffix="issues",
            metadata={"team": "networking"},
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 4}}},
        )
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(1)
        assert job.status == "succeeded", job.error
        first = json.loads((work / "issues.jsonl").read_text().splitlines()[0])
        prompt = next(m["content"] for m in first["messages"] if m["role"] == "user")
        shoot(url, job, prompt, work, args.out)
    finally:
        server.terminate()
        server.wait(30)


def shoot(url: str, job, prompt: str, work: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        for scheme in ("light", "dark"):
            page = browser.new_page(viewport={"width": 1280, "height": 860}, color_scheme=scheme)

            def at(hash_: str, wait: str, page=page) -> None:
                page.goto(f"{url}/dashboard/{hash_}")
                page.wait_for_selector(wait)
                page.wait_for_timeout(300)

            at("#/jobs", "td a")
            page.screenshot(path=out / f"dashboard-jobs-{scheme}.png")
            at(f"#/jobs/{job.id}", "#loss-chart svg")
            page.screenshot(path=out / f"dashboard-job-{scheme}.png", full_page=True)
            at("#/new", "#training-upload")
            page.set_input_files("#training-upload", str(work / "issues.jsonl"))
            page.wait_for_selector(".check")
            page.screenshot(path=out / f"dashboard-new-job-{scheme}.png", full_page=True)
            at(f"#/playground?model={job.fine_tuned_model}&compare=tiny-llama", "#prompt")
            page.fill("#prompt", prompt)
            page.check("#constrained")
            page.click("#send")
            page.wait_for_selector(".confidence", timeout=120_000)
            page.screenshot(path=out / f"dashboard-playground-{scheme}.png", full_page=True)
            page.close()
        browser.close()


if __name__ == "__main__":
    main()
