"""bench/gpu_bench.py, the command a user runs on their GPU, run here on the CPU with a
two-layer model of the default's family: ours and TRL train the same examples, the figures and
the serving levels come back, and MFU is computed once the device's peak is known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_runs_on_a_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gpu_bench.json"
    cmd = [
        sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--data", str(ROOT / "examples" / "issues.json"),
        "--runs", "ours-lora,trl-lora-tuned", "--steps", "2", "--batch", "2", "--max-length", "256",
        "--clients", "1,2", "--serve-tokens", "4", "--peak-tflops", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    ours, trl = results["ours-lora"], results["trl-lora-tuned"]
    assert ours["steps"] == trl["steps"] == 2
    # the same four examples, counted by each trainer's own rendering of the chat template
    assert abs(ours["tokens"] - trl["tokens"]) <= 0.02 * trl["tokens"] and ours["tokens"] > 0
    assert ours["tokens_per_s"] > 0 and ours["plan_peak_gb"] > 0 and ours["device"] == "cpu"
    assert set(results["serve"]) == {"batched/1", "batched/2", "one at a time/1", "one at a time/2"}
    assert results["serve"]["batched/2"]["requests"] == 4 and results["serve"]["one at a time/2"]["peak_batch"] == 1
    table = proc.stdout[proc.stdout.index("| run |") :]
    assert "%" in table.splitlines()[2]  # MFU, against the peak given
