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

from dataclasses import dataclass
from typing import Any

import torch


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


class SlotKVCache:
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        size = (shape.rows, shape.kv_heads, shape.length + 1, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        # What the next forward writes and reads, set by `target` before each call.
        self._rows: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._leading_rows: int | None = None
        self._length: int | None = None

    def target(self, rows: torch.Tensor, index: torch.Tensor, leading_rows: int | None = None,
               length: int | None = None) -> None:
        """Aim the next forward: token (b, t) goes to row `rows[b]`, index `index[b, t]`.

        With `leading_rows=n` the batch is rows 0..n-1 in order and attention reads a view of the first
        n rows (no copy: what a decode step and its CUDA graph use); otherwise it reads a gathered copy
        of `rows` (prefill of newcomers scattered over the cache). With `length`, attention reads only
        indices 0..length-1 (every key the batch can see lies there): less work when shapes may vary.
        """
        self._rows = rows
        self._index = index
        self._leading_rows = leading_rows
        self._length = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (batch, kv_heads, tokens, head_dim) keys/values, return the rows' whole cache."""
        assert self._rows is not None and self._index is not None, "target() the cache before a forward"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = self._rows[:, None]
        # Advanced indices on dims 0 and 2 put (batch, tokens) first: the states go in as (b, t, h, d).
        keys[rows, :, self._index] = key_states.transpose(1, 2)
        values[rows, :, self._index] = value_states.transpose(1, 2)
        span = slice(None, self._length)
        if self._leading_rows is not None:
            return keys[: self._leading_rows, :, span], values[: self._leading_rows, :, span]
        return keys[self._rows, :, span], values[self._rows, :, span]
