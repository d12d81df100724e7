"""The allocator a training process runs on: tcmalloc/jemalloc preloaded when installed
(``allocator_env``), the system's otherwise or when asked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpt_finetune.worker.allocator import ALLOCATORS, allocator_env, allocator_in_use

ALLOCATOR_ENV = "GPT_FINETUNE_MALLOC"  # the malloc setting

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def finder(installed: dict[str, str]):
    asked: list[str] = []

    def find(name: str) -> str | None:
        asked.append(name)
        return installed.get(name)

    return find, asked


def test_auto_prefers_tcmalloc_then_jemalloc_and_keeps_an_existing_preload():
    find, asked = finder({"tcmalloc": "libtcmalloc.so.4", "jemalloc": "libjemalloc.so.2"})
    env = allocator_env({"LD_PRELOAD": "/opt/libfoo.so"}, find=find)
    assert env["LD_PRELOAD"] == "libtcmalloc.so.4 /opt/libfoo.so"
    assert asked == ["tcmalloc_minimal", "tcmalloc"]  # stops at the first found
    find, _ = finder({"jemalloc": "libjemalloc.so.2"})
    assert allocator_env({}, find=find)["LD_PRELOAD"] == "libjemalloc.so.2"
    # tcmalloc's "large alloc" reports would otherwise land in every job's train.log
    assert int(allocator_env({}, find=find)["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


def test_nothing_installed_system_requested_or_already_preloaded_changes_nothing():
    none, _ = finder({})
    assert allocator_env({}, find=none) == {}
    some, asked = finder({name: f"lib{name}.so" for name in ALLOCATORS})
    assert allocator_env({}, "system", find=some) == {}
    assert allocator_env({"LD_PRELOAD": "/usr/lib/libmimalloc.so"}, find=some) == {}
    assert asked == []


def test_a_named_library_is_preloaded_as_given():
    env = allocator_env({}, "/opt/lib/libjemalloc.so.2", find=lambda name: pytest.fail(name))
    assert env["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2"


def child_allocator(env: dict[str, str]) -> str:
    code = "from gpt_finetune.worker.allocator import allocator_in_use; print(allocator_in_use())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_a_process_started_with_it_runs_on_it():
    import os

    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ALLOCATOR_ENV)}
    added = allocator_env(base)
    if not added:
        pytest.skip("no tcmalloc or jemalloc installed (apt install libtcmalloc-minimal4)")
    name = "tcmalloc" if "tcmalloc" in added["LD_PRELOAD"] else "jemalloc"
    assert child_allocator({**base, **added}) == name
    assert child_allocator({**base, **allocator_env(base, "system")}) == "system"
    assert allocator_in_use() in ("system", "tcmalloc", "jemalloc")
