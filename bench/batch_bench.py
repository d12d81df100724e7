"""Many clients at once: this server with continuous batching, against itself one request at a
time and against ``transformers serve --continuous-batching``, on real prompts.

    python bench/batch_bench.py --home DIR [--clients 1,4,16,64] [--servers ours,ours-b1,hf-cb,ours-mimalloc]
                                [--workloads short,long,mixed,mixed-long] [--out bench/out/batch.json]
                                [--dtype float32|bfloat16]

Every request is a streamed chat completion sent with the official ``openai`` client at
temperature 0; a client sends its next request when its last one ends (closed loop), and a level
of C clients sends max(C, 8) requests (long answers: max(C, 4)), every prompt new to the server. Per level: time to first token
and whole-request latency (p50, p95), and completion tokens per second over the level's wall time.

Servers: ``ours`` (this project's ``serve``), ``ours-b1`` (the same, ``--max-batch 1``), ``hf-cb``
(``transformers serve --continuous-batching``), and ``ours-tcmalloc``, ``ours-jemalloc``,
``ours-mimalloc``: ours with that allocator preloaded, as training processes are.

Workloads:
  short  real GitHub issues (``../shared/data/nlbse24_sample.json``, bodies up to 4,000
         characters) under the labelling system prompt, max_tokens 8: prefill-heavy, as a
         labelling bot is
  long   the FAQ questions of ``../shared/data/qa``, max_tokens 128: decode-heavy
  mixed  the short workload spread over the base model and four fine-tuned adapters of it,
         one model per request in turn (this server only: transformers serve cannot mix
         adapters in one batch). The adapters are made by real one-step jobs through the
         server's API the first time.
  mixed-long  the long workload spread over the same five models.

Also printed: how often the batched answers equal the one-at-a-time ones token for token
(temperature 0), and each server's peak resident memory. The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI, OpenAI

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BASE = "SmolLM2-135M-Instruct"
SYSTEM = "Label the GitHub issue as one of: bug, feature, question. Answer with the label only."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _human(record: dict) -> str:
    return next(t["value"] for t in record["conversations"] if t["from"] == "human")


def workload(name: str) -> tuple[list[list[dict]], int]:
    if name in ("short", "mixed"):
        records = json.loads((DATA / "nlbse24_sample.json").read_text())
        random.Random(0).shuffle(records)  # repositories and labels mixed, long bodies included
        return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": _human(r)}] for r in records], 8
    records = []  # long, mixed-long
    for f in sorted((DATA / "qa").glob("*.json")):
        records += json.loads(f.read_text())
    return [[{"role": "user", "content": _human(r)}] for r in records], 128


# this server with a caching allocator preloaded (bench/README "Allocators": does it help serving?)
ALLOCATOR_SERVERS = {"ours-tcmalloc": "tcmalloc_minimal", "ours-jemalloc": "jemalloc", "ours-mimalloc": "mimalloc"}


class Server:
    """One server process on a loopback port, started and stopped by the benchmark."""

    def __init__(self, kind: str, home: str, model_dir: str, dtype: str = "float32") -> None:
        self.kind, self.port = kind, free_port()
        if kind.startswith("ours"):
            cmd = [sys.executable, "-m", "gpt_finetune", "serve", "--home", home, "--port", str(self.port)]
            cmd += ["--log-level", "warning", "--dtype", dtype] + (["--max-batch", "1"] if kind == "ours-b1" else [])
        else:
            cli = str(Path(sys.executable).with_name("transformers"))
            cmd = [cli, "serve", model_dir, "--port", str(self.port), "--device", "cpu", "--dtype", dtype]
            cmd += ["--continuous-batching"] if kind == "hf-cb" else []
        env = dict(os.environ)
        if kind in ALLOCATOR_SERVERS:
            from gpt_finetune.worker.allocator import allocator_env

            env.update(allocator_env(env, ALLOCATOR_SERVERS[kind]))
        log = open(Path(home) / f"{kind}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                httpx.get(self.url + ("/health" if kind.startswith("ours") else "/v1/models"), timeout=2)
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{kind} exited at start: see {home}/{kind}.log") from None
                time.sleep(0.5)
        raise SystemExit(f"{kind} did not answer within 300 s")

    def peak_rss_gb(self) -> float:
        """VmHWM of the server and its children (transformers serve runs in one process)."""
        pids = [self.proc.pid]
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
        kb = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        kb += int(line.split()[1])
            except OSError:
                pass
        return kb / 1e6

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one(client: AsyncOpenAI, model: str, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, text, tokens = None, [], None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else end, "latency": end, "tokens": tokens or 0, "text": "".join(text)}


async def level(
    url: str, models: list[str], prompts: list[list[dict]], first: int, clients: int, n: int, max_tokens: int
):
    """Requests first .. first+n-1: every prompt is new to the server (a prefix cache gains
    nothing a real labelling bot would not), and every server gets the same ones."""
    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", timeout=3600, max_retries=0)
    todo = list(range(first, first + n))
    results: dict[int, dict] = {}

    async def worker() -> None:
        while todo:
            i = todo.pop(0)
            r = await one(client, models[i % len(models)], prompts[i % len(prompts)], max_tokens)
            results[i] = r | {"prompt": i % len(prompts), "model": models[i % len(models)]}

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return wall, [results[i] for i in range(first, first + n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def make_adapters(url: str, home: str, k: int) -> list[str]:
    """k fine-tuned models of the base, each from a real one-step job through the server."""
    client = OpenAI(base_url=url + "/v1", api_key="bench")
    have = [m.id for m in client.models.list() if m.id.startswith("ft:") and ":bench" in m.id]
    if len(have) >= k:
        return sorted(have)[:k]
    records = json.loads((DATA / "nlbse24_sample.json").read_text())[:10]
    path = Path(home) / "bench-train.jsonl"
    with path.open("w") as f:
        for r in records:
            gpt = next(t["value"] for t in r["conversations"] if t["from"] == "gpt")
            label = gpt.strip("[]'\"")
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM},
                            {"role": "user", "content": _human(r)},
                            {"role": "assistant", "content": label},
                        ]
                    }
                )
                + "\n"
            )
    file_id = client.files.create(file=path.open("rb"), purpose="fine-tune").id
    jobs = []
    for i in range(len(have), k):
        jobs.append(
            client.fine_tuning.jobs.create(
                model=BASE,
                training_file=file_id,
                suffix=f"bench{i}",
                hyperparameters={"n_epochs": 1, "batch_size": 10},
                seed=i,
            ).id
        )
    print(f"training {len(jobs)} one-step adapters ...", file=sys.stderr, flush=True)
    for job in jobs:
        while (j := client.fine_tuning.jobs.retrieve(job)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(5)
        if j.status != "succeeded":
            raise SystemExit(f"{job} {j.status}: {j.error}")
        have.append(str(j.fine_tuned_model))
    return sorted(have)[:k]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True, help="a data directory for this benchmark")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--servers", default="ours,ours-b1,hf-cb")
    ap.add_argument("--workloads", default="short,long,mixed,mixed-long")
    ap.add_argument("--long-clients", default="1,4,16", help="client counts for the long workload")
    ap.add_argument("--mixed-clients", default="1,16", help="client counts for the mixed workload")
    ap.add_argument("--out", default="bench/out/batch.json")
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="every server's weights (default float32)"
    )
    args = ap.parse_args()
    home = str(Path(args.home).resolve())
    os.environ["GPT_FINETUNE_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)

    from gpt_finetune.base_catalog import resolve_base
    from gpt_finetune.home import Home
    from gpt_finetune.local.base_weights import model_dir

    runs = []
    hf_model = (
        model_dir(resolve_base(BASE), Home(home))
        if any(not k.startswith("ours") for k in args.servers.split(","))
        else ""
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.servers.split(","):
        for wl in args.workloads.split(","):
            if wl.startswith("mixed") and not kind.startswith("ours"):
                continue
            server = Server(kind, home, hf_model, args.dtype)
            try:
                prompts, max_tokens = workload(wl)
                if kind.startswith("ours"):
                    models = [BASE] + (make_adapters(server.url, home, 4) if wl.startswith("mixed") else [])
                else:
                    models = [hf_model]  # transformers serve names the model by its path
                # warm up: every model loaded (an adapter is read on first use), the base converted once
                first = max(2, len(models))
                asyncio.run(level(server.url, models, prompts, 0, 2, first, max_tokens))
                counts = {"long": args.long_clients, "mixed": args.mixed_clients, "mixed-long": args.mixed_clients}
                counts = counts.get(wl, args.clients)
                for c in [int(x) for x in counts.split(",")]:
                    n = max(c, 8 if max_tokens < 100 else 4)
                    wall, res = asyncio.run(level(server.url, models, prompts, first, c, n, max_tokens))
                    first += n
                    tokens = sum(r["tokens"] for r in res)
                    row = {
                        "server": kind,
                        "dtype": args.dtype,
                        "workload": wl,
                        "clients": c,
                        "requests": n,
                        "tok_s": tokens / wall,
                        "ttft_p50": statistics.median(r["ttft"] for r in res),
                        "ttft_p95": pct([r["ttft"] for r in res], 0.95),
                        "lat_p50": statistics.median(r["latency"] for r in res),
                        "lat_p95": pct([r["latency"] for r in res], 0.95),
                        "wall": wall,
                    }
                    runs.append(row | {"results": res})
                    # a level at a time: a stopped run keeps what it measured
                    out.write_text(json.dumps(runs, indent=1))
                    print(
                        f"| {kind} | {wl} | {c} | {n} | {row['tok_s']:.1f} | {row['ttft_p50']:.2f} | "
                        f"{row['ttft_p95']:.2f} | {row['lat_p50']:.2f} | {row['lat_p95']:.2f} | {wall:.0f} |",
                        flush=True,
                    )
                print(f"# {kind} {wl}: peak RSS {server.peak_rss_gb():.2f} GB", flush=True)
            finally:
                server.stop()
    agreement(runs)
    return 0


def agreement(runs: list[dict]) -> None:
    """Batched answers against the same server one request at a time, same prompt and model."""
    alone = {
        (r["workload"], x["model"], x["prompt"]): x["text"]
        for r in runs
        if r["server"] == "ours-b1"
        for x in r["results"]
    }
    for kind in ("ours", "hf-cb"):
        same = total = 0
        for r in runs:
            if r["server"] != kind:
                continue
            for x in r["results"]:
                model = x["model"] if kind == "ours" else BASE
                ref = alone.get((r["workload"], model, x["prompt"]))
                if ref is not None:
                    total += 1
                    same += ref == x["text"]
        if total:
            print(f"# {kind} answers equal to ours-b1's: {same}/{total}")


if __name__ == "__main__":
    raise SystemExit(main())
