"""The allocator a training process runs on: tcmalloc/jemalloc preloaded when the system has
them, else the mimalloc that the project's install brings (``allocator_env``), the system's
when asked; a preload that fails is said, not silent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import gpt_finetune.worker.allocator as allocator
from gpt_finetune.worker.allocator import ALLOCATORS, allocator_env, allocator_in_use, pip_mimalloc

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


def test_nothing_installed_system_requested_or_already_preloaded_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "pip_mimalloc", lambda: None)  # as on a machine without the wheel
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
        pytest.skip("no caching allocator installed (pip install cmeel-mimalloc)")
    name = next(k for k in allocator.KINDS if k in added["LD_PRELOAD"])
    assert child_allocator({**base, **added}) == name
    assert child_allocator({**base, **allocator_env(base, "system")}) == "system"
    assert allocator_in_use() in ("system", *allocator.KINDS)


def test_the_pip_installed_mimalloc_is_found_and_used_when_the_system_has_none():
    """The local extra installs cmeel-mimalloc on Linux: a machine without root trains on it."""
    lib = pip_mimalloc()
    assert lib is not None, "cmeel-mimalloc is a dependency of the local extra on Linux"
    none, asked = finder({})
    env = allocator_env({}, find=none)
    assert env["LD_PRELOAD"] == lib and asked == ["tcmalloc_minimal", "tcmalloc", "jemalloc"]
    # mimalloc keeps freed pages (else a step faults them in afresh, as on glibc); a user's own setting stays
    assert env["MIMALLOC_PURGE_DELAY"] == "-1"
    assert allocator_env({"MIMALLOC_PURGE_DELAY": "100"}, find=none)["MIMALLOC_PURGE_DELAY"] == "100"
    # the system's tcmalloc still comes first where it is installed
    tc, _ = finder({"tcmalloc_minimal": "libtcmalloc_minimal.so.4"})
    assert allocator_env({}, find=tc)["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    # asked for by name, it is used even where tcmalloc is installed
    assert allocator_env({}, "mimalloc", find=tc)["LD_PRELOAD"] == lib
    import os

    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ALLOCATOR_ENV)}
    assert child_allocator({**base, **env}) == "mimalloc"


def child_prepare(env: dict[str, str]) -> tuple[str, str | None]:
    code = (
        "import json; from gpt_finetune.worker.allocator import prepare_process; print(json.dumps(prepare_process()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    name, warning = json.loads(out.stdout.strip().splitlines()[-1])
    return name, warning


def test_a_preload_that_fails_falls_back_to_the_system_allocator_with_a_warning(tmp_path):
    import os

    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ALLOCATOR_ENV)}
    missing = str(tmp_path / "libnothing.so")
    name, warning = child_prepare({**base, **allocator_env(base, missing)})
    assert name == "system" and warning is not None and missing in warning and "system allocator" in warning
    not_a_library = tmp_path / "libfake.so"
    not_a_library.write_text("not ELF")
    name, warning = child_prepare({**base, **allocator_env(base, str(not_a_library))})
    assert name == "system" and warning is not None and str(not_a_library) in warning
    # a preload that works, or none asked for: no warning
    if added := allocator_env(base):
        assert child_prepare({**base, **added}) == (next(k for k in allocator.KINDS if k in added["LD_PRELOAD"]), None)
    assert child_prepare({**base, **allocator_env(base, "system")}) == ("system", None)
