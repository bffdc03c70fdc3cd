"""A KV cache preallocated at start-up: one row (slot) per running request, a fixed length per row.

Shapes never change after start-up, so a decode step can be captured once as a CUDA graph and replayed.
Row `r` holds request `r`'s keys and values at the indices of its own tokens: the prompt (image tokens,
`<bos>`, prefix) at `[0, prompt_length)`, then one generated token per step. Each row has its own
position, so a request can join or leave between any two steps.

One extra index past the longest sequence, `scratch`, takes the writes of tokens whose results nobody
reads (padding in a prefill batch, idle rows inside a decode step); the attention mask never shows it to
a real token, so those writes can never overwrite a live key.

The object follows the part of transformers' `Cache` interface the Gemma attention layers call
(`update(key, value, layer_idx, ...)`): the layers write through it and attend over what it returns.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheShape:
    layers: int
    rows: int
    kv_heads: int
    length: int  # the longest sequence a row can hold: image tokens + prompt + max_new_tokens
    head_dim: int

    @property
    def scratch(self) -> int:
        return self.length

    def bytes(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.layers * self.rows * self.kv_heads * (self.length + 1) * self.head_dim * element


def cache_shape(text_config: Any, rows: int, length: int) -> CacheShape:
    """The cache of `rows` rows of `length` positions for a language model of `text_config`."""
    text = text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return CacheShape(layers=text.num_hidden_layers, rows=rows, kv_heads=text.num_key_value_heads,
                      length=length, head_dim=head_dim)


# Share of the GPU memory left after loading the model that the KV cache may take: the rest is for
# activations (a prefill of PALIGEMMA_PREFILL_TOKENS), the decode graphs and the mask decoder.
CACHE_MEMORY_SHARE = 0.5


def rows_that_fit(shape: CacheShape, dtype: torch.dtype, free_bytes: int) -> int:
    """The most cache rows (at most `shape.rows`) that fit in CACHE_MEMORY_SHARE of `free_bytes`."""
    per_row = dataclasses.replace(shape, rows=1).bytes(dtype)
    return max(1, min(shape.rows, int(free_bytes * CACHE_MEMORY_SHARE) // per_row))


def fit_to_memory(shape: CacheShape, dtype: torch.dtype, device: torch.device) -> CacheShape:
    """`shape`, with fewer rows where a CUDA device has not the memory for all of them (logged)."""
    if device.type != "cuda":
        return shape
    free, _ = torch.cuda.mem_get_info(device)
    rows = rows_that_fit(shape, dtype, free)
    if rows < shape.rows:
        logger.warning("a KV cache of %d rows would take %.1f GiB of the %.1f GiB free: using %d rows (lower "
                       "PALIGEMMA_MAX_NEW_TOKENS or PALIGEMMA_MAX_PROMPT_TOKENS for more)",
                       shape.rows, shape.bytes(dtype) / 2**30, free / 2**30, rows)
    return dataclasses.replace(shape, rows=rows)


# The three ways a forward uses the cache. Attention reads indices 0..length-1 of the rows it covers
# (every key the batch can see lies there); `None` reads the whole row.


@dataclass(frozen=True)
class Prefill:
    """Newcomers' prompts: token (b, t) goes to row `rows[b]` at index `index[b, t]` (padding at the
    scratch index); attention reads a gathered copy of those rows."""

    rows: torch.Tensor
    index: torch.Tensor
    length: int


@dataclass(frozen=True)
class DecodeStep:
    """One token for each of rows 0..n-1, at `positions[r]` (an idle row at the scratch index); attention
    reads a view of the first n rows, no copy: the fixed-shape step a CUDA graph captures."""

    positions: torch.Tensor
    length: int | None = None


@dataclass(frozen=True)
class DecodeRows:
    """One token for each of chosen rows (one row alone, to find which one makes a step fail), at
    `positions`; attention reads a gathered copy of those rows."""

    rows: torch.Tensor
    positions: torch.Tensor
    length: int | None = None


CacheTarget = Prefill | DecodeStep | DecodeRows


class SlotKVCache:
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        size = (shape.rows, shape.kv_heads, shape.length + 1, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self._row_index = torch.arange(shape.rows, device=device)
        # What the next forward writes and reads: set before each forward.
        self.target: CacheTarget | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (batch, kv_heads, tokens, head_dim) keys/values, return the rows' cache to attend over."""
        target = self.target
        assert target is not None, "set the cache's target before a forward"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if isinstance(target, DecodeStep):
            count = target.positions.shape[0]
            rows, index = self._row_index[:count, None], target.positions[:, None]
        elif isinstance(target, DecodeRows):
            rows, index = target.rows[:, None], target.positions[:, None]
        else:
            rows, index = target.rows[:, None], target.index
        # Advanced indices on dims 0 and 2 put (batch, tokens) first: the states go in as (b, t, h, d).
        keys[rows, :, index] = key_states.transpose(1, 2)
        values[rows, :, index] = value_states.transpose(1, 2)
        span = slice(None, target.length)
        if isinstance(target, DecodeStep):
            return keys[:count, :, span], values[:count, :, span]
        return keys[target.rows, :, span], values[target.rows, :, span]
