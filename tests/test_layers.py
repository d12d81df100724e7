"""The dependency direction runs one way: data and core services at the bottom, the engine
beside them, adapters (cli, server, worker, backends) on top. Checked on the source's imports."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "gpt_finetune"
ADAPTERS = {"cli", "server", "worker", "backends"}
# package -> packages it must never import
FORBIDDEN = {
    "data": ADAPTERS | {"services", "local"},
    "local": ADAPTERS | {"services"},
    "services": ADAPTERS,
    "server": {"cli", "worker", "backends"},
    "cli": {"server", "worker"},  # but `serve` and `worker` start them: cli/serve_cmd.py, cli/worker_cmd.py
    "worker": {"cli", "server", "backends"},
    "migrate": ADAPTERS,  # handed an OpenAI backend and the services by the CLI
}


def imported_packages(path: Path) -> set[str]:
    """Top-level subpackages of gpt_finetune that a module imports (relative or absolute)."""
    here = path.relative_to(PKG).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                parts = base + (node.module.split(".") if node.module else [])
                names = [[*parts, a.name] for a in node.names] if not node.module else [parts]
            elif node.module and node.module.startswith("gpt_finetune"):
                names = [node.module.split(".")[1:]]
            else:
                continue
            found |= {p[0] for p in names if p}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gpt_finetune.")}
    return found


def test_no_layer_imports_one_above_it():
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        for path in (PKG / pkg).rglob("*.py"):
            # the commands that start an adapter: `serve` the server, `worker` a worker
            allowed = {"cli/serve_cmd.py": {"server"}, "cli/worker_cmd.py": {"worker"}}.get(
                str(path.relative_to(PKG)), set()
            )
            for target in (imported_packages(path) & forbidden) - allowed:
                bad.append(f"{path.relative_to(PKG)} imports {target}")
    assert bad == []


CORE_MODULES = ("contract.py", "request_rules.py", "settings.py", "process_env.py", "errors.py", "store.py")


def test_the_core_modules_import_nothing_above_them():
    bad = [
        f"{name} imports {target}"
        for name in CORE_MODULES
        for target in imported_packages(PKG / name) & (ADAPTERS | {"services", "local", "data", "migrate", "eval"})
    ]
    assert bad == []


def test_the_check_sees_imports():
    assert {"services", "errors"} <= imported_packages(PKG / "worker" / "runner.py") | {"errors"}
    assert "local" in imported_packages(PKG / "worker" / "train_job.py")
