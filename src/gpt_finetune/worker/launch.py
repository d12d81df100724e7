"""Starting the training runner: the adapters' launcher (``JobService.kick`` calls it).

The runner is a detached process of this interpreter (``python -m gpt_finetune.worker.runner``)
with the user's environment (``process_env.user_environ``: what the CLI set for its own
inference taken out) and this package importable from wherever it was imported here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..home import Home
from ..process_env import user_environ

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds gpt_finetune/


def start_runner(home: Home, extra_env: dict[str, str] | None = None) -> None:
    env = user_environ()
    env.update(extra_env or {})  # the store's URL, set in a config file or flag rather than the environment
    # found from a source checkout too (no install), whatever the working directory
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(home.logs / "runner.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "gpt_finetune.worker.runner", "--home", str(home.root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=env,
            close_fds=True,
        )
