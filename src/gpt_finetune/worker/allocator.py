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
# install (Debian/Ubuntu: libtcmalloc-minimal4, libgoogle-perftools4, libjemalloc2).
ALLOCATORS = ("tcmalloc_minimal", "tcmalloc", "jemalloc")


def allocator_env(environ: Mapping[str, str], choice: str | None = None, find: Any = None) -> dict[str, str]:
    """Environment additions that start a training process on a caching allocator.

    glibc maps each large tensor fresh and unmaps it when freed (``limit_heap_growth``: without
    that its heap drifts to twice the live size), so every step pays a page fault per fresh 4 kB
    page: a fifth of a CPU step's time. tcmalloc (or jemalloc) keeps freed pages in size classes
    and reuses them, without glibc's heap fragmentation: faster steps at a lower peak
    (bench/README.md has the measurements). It is used when
    installed, by preloading it into the training process (the only way to replace the allocator
    of an already-built torch). ``choice`` (the ``malloc`` setting, ``GPT_FINETUNE_MALLOC``):
    unset or ``auto`` picks the first of
    ``ALLOCATORS`` found; ``system`` keeps glibc; anything else is a library name or path to
    preload. torch's own launcher (``torch.backends.xeon.run_cpu``) does the same but looks only
    for unversioned ``libtcmalloc.so``/``libjemalloc.so`` outside Debian's multiarch directories,
    and also pins cores and threads, which a job on a shared laptop should not.
    """
    import sys

    choice = (choice or "auto").strip() or "auto"
    preload = environ.get("LD_PRELOAD", "")
    if choice == "system" or not sys.platform.startswith("linux") or "malloc" in preload:
        return {}
    if choice == "auto":
        if find is None:
            from ctypes.util import find_library as find
        lib = next((found for name in ALLOCATORS if (found := find(name))), None)
        if lib is None:
            return {}
    else:
        lib = choice
    return {
        "LD_PRELOAD": f"{lib} {preload}".strip(),
        # tcmalloc reports every allocation over 1 GB on stderr (the job's train.log): not news here
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40)),
    }


def allocator_in_use() -> str:
    """The allocator this process runs on: a preloaded tcmalloc or jemalloc, else the system's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def prepare_process() -> str:
    """Called by a training process before it trains: the allocator it runs on, and on glibc's
    the heap limit that keeps its resident size near what is live."""
    allocator = allocator_in_use()
    if allocator == "system":  # a preloaded tcmalloc/jemalloc reuses freed blocks itself
        limit_heap_growth()
    return allocator
