"""A non-editable, offline install: the wheel carries what the quickstart needs (its example data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_wheel_install_carries_the_example_data(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        str(ROOT),
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
    ]
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path, timeout=300)
    wheel = next(wheels.glob("gpt_finetune-*.whl"))
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        "--target",
        str(target),
        str(wheel),
    ]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = "import gpt_finetune, gpt_finetune.cli.quickstart as q; print(gpt_finetune.__file__); print(q.EXAMPLES)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    package_file, examples = out.stdout.split()
    assert Path(package_file).is_relative_to(target)  # the installed copy, not the source tree
    assert Path(examples).is_relative_to(target) and (Path(examples) / "issues.json").is_file()
    # the quickstart's first step, from the installed package alone
    cmd = [sys.executable, "-m", "gpt_finetune", "prepare", "-i", f"{examples}/issues.json", "-o", "out.jsonl"]
    run = subprocess.run([*cmd, "-c", f"{examples}/data_process.cfg"], env=env, cwd=tmp_path, capture_output=True)
    assert run.returncode == 0, run.stderr
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first["messages"][-1]["role"] == "assistant"
