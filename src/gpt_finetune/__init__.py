"""gpt-finetune: prepare chat data, fine-tune models on OpenAI or your own machine, use them.

The public API is what this module exports; everything else is private and may change.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .atomic import atomic_outputs, write_text_atomic
from .cfgfile import read_cfg
from .data.analysis import FileReport, analyze_file
from .data.convert import ConvertOptions, convert_record
from .data.labels import format_labels, parse_labels
from .data.prepare import PrepareResult, prepare
from .data.stats import job_cost, stats_dict
from .errors import BackendError, ConfigError, DataError, DependencyError, GptFinetuneError, NotFoundError
from .openai_facts import default_epochs, model_info
from .settings import Settings, load_settings, redact

__all__ = [
    "BackendError",
    "ConfigError",
    "ConvertOptions",
    "DataError",
    "DependencyError",
    "FileReport",
    "GptFinetuneError",
    "NotFoundError",
    "PrepareResult",
    "Settings",
    "__version__",
    "analyze_file",
    "atomic_outputs",
    "convert_record",
    "default_epochs",
    "format_labels",
    "job_cost",
    "load_settings",
    "model_info",
    "parse_labels",
    "prepare",
    "read_cfg",
    "redact",
    "stats_dict",
    "write_text_atomic",
]
