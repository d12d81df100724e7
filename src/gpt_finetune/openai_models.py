"""What OpenAI's fine-tuning charges and accepts, per base model (see DESIGN.md "Facts").

Prices are USD per 1M training tokens; limits are tokens per training example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    encoding: str
    price_per_million: float | None
    example_token_limit: int


# Longest prefix wins, so "gpt-4.1-mini-2025-04-14" matches "gpt-4.1-mini", not "gpt-4.1".
MODELS: tuple[ModelInfo, ...] = (
    ModelInfo("gpt-4.1-nano", "o200k_base", 1.5, 32_768),
    ModelInfo("gpt-4.1-mini", "o200k_base", 5.0, 65_536),
    ModelInfo("gpt-4.1", "o200k_base", 25.0, 65_536),
    ModelInfo("gpt-4o-mini", "o200k_base", 3.0, 65_536),
    ModelInfo("gpt-4o", "o200k_base", 25.0, 65_536),
    ModelInfo("gpt-3.5-turbo", "cl100k_base", 8.0, 16_385),
    ModelInfo("gpt-4", "cl100k_base", None, 8_192),
)
DEFAULT_MODEL = "gpt-3.5-turbo"  # the seed's


def model_info(model: str | None) -> ModelInfo:
    """Info for an OpenAI model name, a dated snapshot or an ``ft:`` model built on one.

    Unknown names get gpt-4o-mini's encoding and limits with no price."""
    name = (model or DEFAULT_MODEL).strip()
    if name.startswith("ft:"):
        name = name.split(":")[1]
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


def default_epochs(n_examples: int) -> int:
    """3, raised so that examples x epochs >= 100, lowered so that it is <= 25,000, within 1..25.

    The cookbook rounds the raised value down (100 // n), which can leave the product under 100;
    we round up, so the stated rule holds."""
    if n_examples <= 0:
        return TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS
