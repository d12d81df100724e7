"""``gpt-finetune``: parser and dispatch, and the entry point of the seed's three scripts."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import GptFinetuneError
from ..settings import from_env

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module attribute that adds arguments, help)
    "prepare": ("data_cmds.add_prepare", "convert raw data to OpenAI chat JSONL (the seed's data_process.py)"),
    "validate": ("data_cmds.add_validate", "check a chat JSONL file as OpenAI would, and more"),
    "stats": ("data_cmds.add_stats", "token counts, label distribution and the cost of a job"),
    "finetune": ("job_cmds.add_finetune", "upload data and create a fine-tuning job (the seed's finetune.py)"),
    "infer": ("infer_cmd.add_infer", "ask a model a question (the seed's infer.py)"),
    "chat": ("infer_cmd.add_chat", "talk with a model in the terminal"),
    "files": ("job_cmds.add_files", "upload, list, get, delete files"),
    "jobs": ("job_cmds.add_jobs", "create, list, get, follow, cancel fine-tuning jobs"),
    "models": ("job_cmds.add_models", "list, get, delete models"),
    "eval": ("eval_cmd.add_eval", "score models side by side on held-out data, against a TF-IDF baseline"),
    "serve": ("serve_cmd.add_serve", "serve OpenAI's fine-tuning and chat API from this machine"),
    "worker": ("worker_cmd.add_worker", "train queued jobs on this machine, from a store several machines share"),
    "workers": ("worker_cmd.add_workers", "list the workers that train jobs, and what each does"),
    "migrate": ("migrate_cmd.add_migrate", "move OpenAI fine-tunes here: inventory, record, retrain, alias, compare"),
    "quickstart": ("quickstart.add_quickstart", "prepare the example data, fine-tune the default model here, compare"),
}
SEED_SCRIPTS = {"prepare": "data_process.py", "finetune": "finetune.py", "infer": "infer.py"}


def _adder(name: str) -> Callable[[argparse.ArgumentParser], None]:
    import importlib

    module, func = COMMANDS[name][0].split(".")
    return getattr(importlib.import_module(f"{__package__}.{module}"), func)  # type: ignore[no-any-return]


def _common(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """``--debug`` and ``--home`` on a command, and again on each of its subcommands (``files
    list --home DIR`` as well as ``files --home DIR list``); there they default to SUPPRESS, so
    a subcommand that is not given them keeps what the command was given."""
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if nested else {}
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs", **extra)
    p.add_argument(
        "--home",
        dest="home",
        metavar="DIR",
        help="data directory (default $GPT_FINETUNE_HOME or ~/.gpt-finetune)",
        **extra,
    )
    p.add_argument(
        "--store-url",
        dest="store_url",
        metavar="URL",
        help="the store: postgresql://USER@HOST/DB shared by several machines (default $GPT_FINETUNE_STORE_URL, "
        "else SQLite in the data directory)",
        **extra,
    )
    for action in p._actions if not nested else []:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _common(sub, nested=True)


def build_parser(prog: str = "gpt-finetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Prepare chat data, fine-tune models on OpenAI or on this machine, and use them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        _adder(name)(p)
        _common(p)
    return parser


def build_seed_parser(command: str, prog: str) -> argparse.ArgumentParser:
    text = COMMANDS[command][1]
    p = argparse.ArgumentParser(prog=prog, description=text)
    _adder(command)(p)
    _common(p)
    return p


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    try:
        ns = parser.parse_args(argv)
    except GptFinetuneError as exc:  # a bad flag value (cli.common.typed)
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    try:
        debug = bool(ns.debug or from_env("debug"))
    except GptFinetuneError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(ns.func(ns) or 0)
    except GptFinetuneError as exc:
        if debug:
            raise
        print(f"Error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"Hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the machine's limits (a full disk, a name too long, permissions): one line
        if debug:
            raise
        print(f"Error: {os_error(exc)}", file=sys.stderr)
        return 1
    finally:
        _flush_stdout()


def os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return where + (exc.strerror or str(exc))


def _flush_stdout() -> None:
    """Flush standard output now, inside the error handling: written to a full device, the
    flush fails, and Python would otherwise report it as an ignored exception at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except OSError as exc:
        # nothing more can be written there: say it on stderr, and let no later flush fail again
        print(f"Error: standard output: {exc.strerror or exc}", file=sys.stderr)
        sys.stdout = open(os.devnull, "w")
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser(), argv)


def run_seed(command: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of data_process.py, finetune.py and infer.py: one command, its own ``-h``."""
    passive_openmp_threads()
    return _run(build_seed_parser(command, SEED_SCRIPTS[command]), argv)


def passive_openmp_threads() -> None:
    """Let torch's OpenMP threads sleep, not spin, while they wait for work (unless the user chose).

    Spinning threads fight another process's threads for the cores: answering while a training
    job shares them was many times slower with spinning threads (bench/README.md, "The server
    answers while a job trains").
    Set before torch loads (it reads the variable once). Training processes started from here are
    given the user's own setting back (``process_env.user_environ``, which the runner's launcher
    uses), so their benchmarked speed is unchanged.
    """
    from ..process_env import set_default

    set_default("OMP_WAIT_POLICY", "PASSIVE")


def console() -> None:
    passive_openmp_threads()
    sys.exit(main())


if __name__ == "__main__":
    console()
