#!/usr/bin/env python3
"""The seed's data_process.py: a thin shim over `gpt-finetune prepare` (run with -h for usage)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from gpt_finetune.cli import run_seed

if __name__ == "__main__":
    sys.exit(run_seed("prepare"))
