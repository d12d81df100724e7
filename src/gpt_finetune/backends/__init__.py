"""Backends for the job and inference commands.

Both speak in the openai SDK's own types (``FileObject``, ``FineTuningJob``,
``FineTuningJobEvent``, ...), so one job-watching loop and one printer serve both:

- ``openai``: the official SDK against OpenAI or any compatible base URL (this project's server too);
- ``local``: this project's services in-process; jobs train in a detached worker process.
"""

from __future__ import annotations

from .base import Backend, Hyperparameters

__all__ = ["Backend", "Hyperparameters"]
