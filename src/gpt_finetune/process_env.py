"""Environment variables this process set for itself, and the environment its training
processes get instead.

The CLI lets torch's OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``: answering
while a job trains on the same cores is much faster so), but a training process should run with
the user's own setting, as benchmarked. The record is kept here, in this process, rather than in
a marker variable that every child would inherit and have to know about.
"""

from __future__ import annotations

import os

_SET_BY_US: dict[str, str | None] = {}  # name -> the value it had before (None: unset)


def set_default(name: str, value: str) -> None:
    """Set ``name`` for this process unless the user already did."""
    if name not in os.environ:
        _SET_BY_US[name] = None
        os.environ[name] = value


def user_environ() -> dict[str, str]:
    """This process's environment with what ``set_default`` added taken out again."""
    env = dict(os.environ)
    for name, before in _SET_BY_US.items():
        if before is None:
            env.pop(name, None)
        else:
            env[name] = before
    return env
