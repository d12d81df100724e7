"""The allocator a training process runs on: chosen by the runner (preloaded into the job's
process), checked and tuned by that process before it trains. Process plumbing of the worker,
kept out of the engine's memory plan."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def limit_heap_growth() -> None:
    """Serve large allocations from mmap and give them back when freed.

    glibc raises its mmap threshold as large blocks are freed, after which a training step's
    activation tensors come from the heap and freed ones are kept, and the resident peak drifts
    far above what is live. A fixed threshold turns the drift off for blocks of 2 MB and more (a
    micro-batch's activations), at the price of a page fault per fresh page; lower thresholds cost
    more speed. The measurements are in bench/README.md ("Where a step's time goes").
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2 << 20)  # M_MMAP_THRESHOLD: fixed, which also stops its growth
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


# Faster allocators for a training process, in order of preference, by the names their packages
# install (Debian/Ubuntu: libtcmalloc-minimal4, libgoogle-perftools4, libjemalloc2), then the one
# the project's own install brings (``cmeel-mimalloc``, a dependency of the local extra on Linux),
# so that a machine without root still trains on a caching allocator. The order follows the
# measurements in bench/README.md ("Allocators"): tcmalloc first where the system has it.
ALLOCATORS = ("tcmalloc_minimal", "tcmalloc", "jemalloc", "mimalloc")
# what a preloaded library is called in /proc/self/maps, for each name above
KINDS = ("tcmalloc", "jemalloc", "mimalloc")
# set by the runner to the library it preloads, so that the process can tell a preload that failed
# (the dynamic loader only prints a line and carries on) from one never asked for
PRELOADED = "GPT_FINETUNE_PRELOADED"


def pip_mimalloc() -> str | None:
    """The path of ``libmimalloc.so`` from the ``cmeel-mimalloc`` wheel, when it is installed.

    cmeel wheels put their libraries under ``site-packages/cmeel.prefix/lib``; the
    distribution's file list says where, without importing anything."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("cmeel-mimalloc")
    except (ImportError, PackageNotFoundError):
        return None
    names = sorted((str(f) for f in dist.files or () if Path(str(f)).name.startswith("libmimalloc.so")), key=len)
    for name in names:  # the shortest (libmimalloc.so) is a copy of the versioned ones: any will do
        path = Path(str(dist.locate_file(name)))
        if path.is_file():
            return str(path)
    return None


def find_allocator(name: str, find: Any = None) -> str | None:
    """Where the allocator ``name`` (one of ``ALLOCATORS``) is installed, or None."""
    if find is None:
        from ctypes.util import find_library as find
    if name == "mimalloc":
        return pip_mimalloc() or find(name)
    return find(name)


def allocator_env(environ: Mapping[str, str], choice: str | None = None, find: Any = None) -> dict[str, str]:
    """Environment additions that start a training process on a caching allocator.

    glibc maps each large tensor fresh and unmaps it when freed (``limit_heap_growth``: without
    that its heap drifts to twice the live size), so every step pays a page fault per fresh 4 kB
    page: a fifth of a CPU step's time. tcmalloc, jemalloc and mimalloc keep freed pages in size
    classes and reuse them, without glibc's heap fragmentation: faster steps at a lower peak
    (bench/README.md has the measurements). One is used by preloading it into the training
    process (the only way to replace the allocator of an already-built torch). ``choice`` (the
    ``malloc`` setting, ``GPT_FINETUNE_MALLOC``): unset or ``auto`` picks the first of
    ``ALLOCATORS`` found; ``system`` keeps glibc; one of ``ALLOCATORS`` asks for that one (the
    system allocator when it is not installed, which the job's events then say); anything else
    is a library name or path to preload. torch's own launcher (``torch.backends.xeon.run_cpu``)
    does the same but looks only for unversioned ``libtcmalloc.so``/``libjemalloc.so`` outside
    Debian's multiarch directories, and also pins cores and threads, which a job on a shared
    laptop should not.
    """
    import sys

    choice = (choice or "auto").strip() or "auto"
    preload = environ.get("LD_PRELOAD", "")
    if choice == "system" or not sys.platform.startswith("linux") or "malloc" in preload:
        return {}
    lib: str | None
    if choice == "auto":
        lib = next((found for name in ALLOCATORS if (found := find_allocator(name, find))), None)
    elif choice in ALLOCATORS:
        lib = find_allocator(choice, find) or choice  # absent: the preload fails, and the job says so
    else:
        lib = choice
    if lib is None:
        return {}
    env = {
        "LD_PRELOAD": f"{lib} {preload}".strip(),
        PRELOADED: lib,
        # tcmalloc reports every allocation over 1 GB on stderr (the job's train.log): not news here
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40),
    }
    if "mimalloc" in Path(lib).name:
        # mimalloc gives freed pages back to the system 10 ms after they are freed, so a training
        # step faults its activations in afresh as on glibc: no faster than glibc, measured. Kept
        # (as tcmalloc keeps them), and on transparent huge pages where the kernel allows, it
        # trains as fast as tcmalloc at a peak the memory plan covers (bench/README "Allocators").
        env |= {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}
    return {k: environ.get(k, v) if k.startswith(("TCMALLOC_", "MIMALLOC_")) else v for k, v in env.items()}


def allocator_in_use() -> str:
    """The allocator this process runs on: a preloaded tcmalloc, jemalloc or mimalloc, else the system's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in KINDS:
        if f"lib{name}" in maps:
            return name
    return "system"


def preload_failure(environ: Mapping[str, str], in_use: str) -> str | None:
    """A warning when the runner preloaded a library this process does not run on (a path that
    does not exist, a library for another machine): the loader printed one line to the job's
    log and carried on with the system allocator, which the job's events should say."""
    asked = environ.get(PRELOADED)
    if not asked or in_use != "system":
        return None
    return (
        f"Could not preload the allocator {asked} (see the job's train.log): training on the system "
        "allocator, which is slower on a CPU; set malloc = system to stop trying, or install one "
        '(README, "Allocator")'
    )


def prepare_process(environ: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """Called by a training process before it trains: the allocator it runs on (with a warning
    when the one its runner preloaded did not load), and on glibc's the heap limit that keeps
    its resident size near what is live."""
    import os

    allocator = allocator_in_use()
    if allocator == "system":  # a preloaded caching allocator reuses freed blocks itself
        limit_heap_growth()
    return allocator, preload_failure(os.environ if environ is None else environ, allocator)
