"""An order-keeping parallel map with a bounded window, so memory stays flat.

``ProcessPoolExecutor.map`` and ``multiprocessing.Pool.imap`` both drain their input iterator
eagerly, which would read a whole file into memory; this submits at most ``window`` chunks ahead.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
# files smaller than this are processed inline by the data jobs: a pool's start-up costs more
PARALLEL_MIN_BYTES = 4 * 1024 * 1024
R = TypeVar("R")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable[..., R], chunks: Iterable[T], *args: Any, workers: int = 0, window: int = 0
) -> Iterator[R]:
    """``fn(chunk, *args)`` for each chunk, in order. ``workers <= 1`` runs inline."""
    workers = workers or default_workers()
    if workers <= 1:
        for chunk in chunks:
            yield fn(chunk, *args)
        return
    window = window or workers * 3
    # fork where there is one: workers share what the parent already loaded (the tokenizer's
    # ~120 MB of tables) copy-on-write instead of loading their own. Callers are command-line
    # jobs with no threads running; a server process should call with workers=1.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # the garbage collector of a forked worker would write to every object it inherits (its
    # header), turning shared pages into private copies; frozen objects are left alone
    gc.freeze()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(fn, chunk, *args))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
            gc.unfreeze()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
