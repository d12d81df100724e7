"""The engine's running batch: sequences that join and leave between decoding steps.

Why our own loop rather than transformers' continuous-batching manager (the one under
``transformers serve --continuous-batching``): that manager takes one generation config for
every request (temperature, top-p and the end tokens are the manager's, not the request's),
returns the chosen token's log-probability but not the ``top_logprobs`` OpenAI's API lists,
has no per-request random generator (``seed``), no stop strings, and runs one set of weights: no
row of its batch can use another LoRA adapter than its neighbours. Each of those is part of
this server's contract, so the scheduling is ours and the arithmetic stays transformers' and
PEFT's: every step is one ordinary forward pass of the model, with a cache object of ours
(``SlotCache``) in place of transformers' and PEFT's ``adapter_names`` choosing each row's
adapter.

The layout is a padded one, sized by what the batch needs: per layer one buffer of
[rows, key-value heads, width, head dim], a sequence to a row, its tokens at positions 0 to
length - 1 and the rest masked off. Rows stay contiguous (a finished sequence's row is refilled
by the last one, a copy of that one sequence), so a step's keys and values are a view of the
buffers, never a gather. The price of padding is that memory is reserved for rows x the longest
final length; the engine admits a sequence only when that product, over every running batch,
stays within its budget (``kv_budget``), so the cache can never outgrow it. A paged cache (vLLM's)
wastes less on mixed lengths but needs its own attention kernel; on a CPU, SDPA over a padded
view is what PyTorch runs fastest.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

PREFILL_CHUNK = 512  # prompt tokens per prefill step: a long prompt never stalls the batch for long


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in every layer of this model."""
    text = getattr(config, "text_config", None) or config
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    return 2 * int(text.num_hidden_layers) * heads * head_dim * torch.finfo(dtype).bits // 8


def plain_attention(cache: DynamicCache) -> bool:
    """Whether every layer of this (prefilled) cache is a plain, full-attention one: what the slot
    layout can hold. Sliding-window or hybrid layers decode one sequence at a time instead."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class SlotCache(Cache):
    """The running batch's keys and values (see the module's docstring). ``positions`` and
    ``width`` are set before each step: where each row's new token goes, and how many positions
    the step attends over."""

    is_compileable = False

    def __init__(self, n_layers: int) -> None:  # no Cache.__init__: the layers are ours
        # transformers' mask code asks each layer whether it is sliding: these answer no
        self.layers = [types.SimpleNamespace() for _ in range(n_layers)]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.positions = torch.zeros(0, dtype=torch.long)
        self.width = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width) allocated."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def reserve(self, rows: int, width: int, like: DynamicCache) -> None:
        """Room for ``rows`` rows of ``width`` positions (growing keeps what the rows hold)."""
        have_rows, have_width = self.shape
        if rows <= have_rows and width <= have_width:
            return
        rows, width = max(rows, have_rows), max(width, have_width)
        keys, values = [], []
        for i, layer in enumerate(like.layers):
            k, v = layer.keys, layer.values
            nk = k.new_zeros((rows, k.shape[1], width, k.shape[3]))
            nv = v.new_zeros((rows, v.shape[1], width, v.shape[3]))
            if self.keys:
                nk[:have_rows, :, :have_width] = self.keys[i]
                nv[:have_rows, :, :have_width] = self.values[i]
            keys.append(nk)
            values.append(nv)
        self.keys, self.values = keys, values

    def put(self, row: int, prefilled: DynamicCache, length: int) -> None:
        for i, layer in enumerate(prefilled.layers):
            self.keys[i][row, :, :length] = layer.keys[0, :, :length]
            self.values[i][row, :, :length] = layer.values[0, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]

    def release(self) -> None:
        self.keys, self.values = [], []

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        rows = key_states.shape[0]
        index = torch.arange(rows, device=key_states.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[index, :, self.positions] = key_states[:, :, 0]
        values[index, :, self.positions] = value_states[:, :, 0]
        return keys[:rows, :, : self.width], values[:rows, :, : self.width]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.width


@dataclass
class Prefill:
    """A prompt being read, ``PREFILL_CHUNK`` tokens a step, into a cache of its own."""

    cache: DynamicCache
    done: int = 0
    logits: Any = None  # the last position's, once the whole prompt is read


@dataclass
class Sequence:
    """One answer being generated: a choice of a request, or one prompt of a batch."""

    request: Any  # inference._Running
    choice: int
    prompt: Any  # [1, prompt tokens] ids
    max_new: int
    adapter: str | None  # the PEFT adapter name its rows use; None: the base model
    generator: Any
    ids: list[int] = field(default_factory=list)
    text: str = ""
    shown: int = 0  # characters of the answer already emitted
    finish: str | None = None
    length: int = 0  # tokens in its row of the cache
    next_token: int | None = None  # chosen, not yet fed to the model
    prefill: Prefill | None = None
    own_cache: DynamicCache | None = None  # models the slot layout cannot hold

    @property
    def final_length(self) -> int:
        """What its row may need: the prompt and every token it may generate."""
        return int(self.prompt.shape[1]) + self.max_new
