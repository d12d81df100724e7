"""What OpenAI's fine-tuning charges, accepts, and until when (see DESIGN.md "Facts").

Training prices are USD per 1M training tokens; inference prices USD per 1M input and output
tokens of a *fine-tuned* model (OpenAI's pricing page, fine-tuning section, as quoted by secondary
sources in April 2026; the Batch API bills half); limits are tokens per training example.

The shutdown dates are OpenAI's deprecations page as quoted by secondary sources (2026-12): one
dated table, which ``gpt-finetune migrate`` lets the user override (``--shutdown-table FILE``).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    encoding: str
    price_per_million: float | None
    example_token_limit: int
    input_price: float | None = None  # a fine-tuned model's inference, USD per 1M prompt tokens
    output_price: float | None = None  # ... and per 1M completion tokens


# Longest prefix wins, so "gpt-4.1-mini-2025-04-14" matches "gpt-4.1-mini", not "gpt-4.1".
MODELS: tuple[ModelInfo, ...] = (
    ModelInfo("gpt-4.1-nano", "o200k_base", 1.5, 32_768, 0.20, 0.80),
    ModelInfo("gpt-4.1-mini", "o200k_base", 5.0, 65_536, 0.80, 3.20),
    ModelInfo("gpt-4.1", "o200k_base", 25.0, 65_536, 3.00, 12.00),
    ModelInfo("gpt-4o-mini", "o200k_base", 3.0, 65_536, 0.30, 1.20),
    ModelInfo("gpt-4o", "o200k_base", 25.0, 65_536, 3.75, 15.00),
    ModelInfo("gpt-3.5-turbo", "cl100k_base", 8.0, 16_385, 3.00, 6.00),
    ModelInfo("gpt-4", "cl100k_base", None, 8_192),
)
BATCH_DISCOUNT = 0.5  # the Batch API's price as a share of the live one

# From this day no organisation can create a fine-tuning job (HTTP 403, training_not_available).
TRAINING_ENDS = dt.date(2027, 1, 6)
# The day a base model, and every fine-tune of it, stops serving. Longest prefix wins, as above:
# fine-tuned model ids name the snapshot (ft:gpt-4o-2024-08-06:...), the bare names stand for the
# snapshot OpenAI's alias pointed to.
RETIREMENTS: dict[str, dt.date] = {
    "gpt-3.5-turbo": dt.date(2026, 10, 23),
    "gpt-4-0613": dt.date(2026, 10, 23),
    "gpt-4": dt.date(2026, 10, 23),
    "gpt-4.1-nano": dt.date(2026, 10, 23),
    "gpt-4o-2024-05-13": dt.date(2026, 10, 23),
    "gpt-4o-2024-08-06": dt.date(2027, 1, 14),
    "gpt-4o-2024-11-20": dt.date(2027, 1, 14),
    "gpt-4o": dt.date(2027, 1, 14),
    "gpt-4o-mini": dt.date(2027, 1, 14),
    "gpt-4.1-2025-04-14": dt.date(2027, 1, 14),
    "gpt-4.1": dt.date(2027, 1, 14),
    "gpt-4.1-mini": dt.date(2027, 1, 14),
}


def load_shutdown_table(path: str | None) -> tuple[dt.date, dict[str, dt.date]]:
    """(the day training ends, the retirement table), the built-in one with a user's file over it.

    The file is JSON: ``{"training_ends": "2027-01-06", "retirements": {"gpt-4o-mini": "2027-01-14"}}``,
    either key optional; a model named there replaces (or adds to) the built-in entry."""
    import json

    from .errors import DataError

    table = dict(RETIREMENTS)
    if path is None:
        return TRAINING_ENDS, table
    try:
        raw = json.loads(open(path, encoding="utf-8").read())
    except OSError as exc:
        raise DataError(f"cannot be read: {exc.strerror}", path=path) from None
    except ValueError as exc:
        raise DataError(f"not JSON: {exc}", path=path) from None
    if not isinstance(raw, dict) or set(raw) - {"training_ends", "retirements"}:
        raise DataError('expected {"training_ends": "YYYY-MM-DD", "retirements": {"model": "YYYY-MM-DD"}}', path=path)

    def day(text: object, where: str) -> dt.date:
        try:
            return dt.date.fromisoformat(str(text)) if isinstance(text, str) and len(text) == 10 else _bad()
        except ValueError:
            raise DataError("expected a date written YYYY-MM-DD", path=path, field=where) from None

    ends = day(raw["training_ends"], "training_ends") if "training_ends" in raw else TRAINING_ENDS
    given = raw.get("retirements", {})
    if not isinstance(given, dict):
        raise DataError("expected an object of model names and dates", path=path, field="retirements")
    for name, when in given.items():
        table[str(name)] = day(when, f"retirements.{name}")
    return ends, table


def _bad() -> dt.date:
    raise ValueError


def base_of(model: str) -> str:
    """The base model of an OpenAI model id: ``ft:gpt-4o-mini-2024-07-18:acme::x`` -> the snapshot."""
    name = model.strip()
    return name.split(":")[1] if name.startswith("ft:") and name.count(":") >= 2 else name


def stops_serving(model: str, table: dict[str, dt.date] | None = None) -> dt.date | None:
    """The day ``model`` (a base model or a fine-tune of one) stops serving, or None if unknown."""
    name = base_of(model)
    table = RETIREMENTS if table is None else table
    for prefix in sorted(table, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "-"):
            return table[prefix]
    return None


DEFAULT_MODEL = "gpt-3.5-turbo"  # the seed's


def model_info(model: str | None) -> ModelInfo:
    """Info for an OpenAI model name, a dated snapshot or an ``ft:`` model built on one.

    Unknown names get gpt-4o-mini's encoding and limits with no price."""
    name = base_of(model or DEFAULT_MODEL)
    for info in sorted(MODELS, key=lambda m: -len(m.name)):
        if name == info.name or name.startswith(info.name + "-"):
            return info
    return ModelInfo(name, "o200k_base", None, 65_536)


# OpenAI's default-epochs rule, as its cookbook data-prep notebook states it.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25


def default_epochs(n_examples: int, target: int = TARGET_EPOCHS) -> int:
    """3, raised so that examples x epochs >= 100, lowered so that it is <= 25,000, within 1..25.

    The cookbook rounds the raised value down (100 // n), which can leave the product under 100;
    we round up, so the stated rule holds. ``target`` replaces the 3 (a local classification job
    aims at more epochs: ``contract.CLASSIFICATION_EPOCHS``); the bounds stay OpenAI's."""
    if n_examples <= 0:
        return target
    if n_examples * target < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * target > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return target
