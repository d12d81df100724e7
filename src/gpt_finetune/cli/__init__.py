"""The command line: ``gpt-finetune`` and the seed's three scripts."""

from .main import main, run_seed

__all__ = ["main", "run_seed"]
