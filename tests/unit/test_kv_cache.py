"""Sizing the preallocated KV cache: its bytes, and the rows that fit in the memory a GPU has left."""

from __future__ import annotations

import torch

from app.engine.kv_cache import CACHE_MEMORY_SHARE, CacheShape, rows_that_fit


def test_the_cache_takes_as_many_rows_as_fit_in_its_share_of_free_memory():
    shape = CacheShape(layers=18, rows=32, kv_heads=1, length=768, head_dim=256)
    per_row = 2 * 18 * 769 * 256 * 2  # keys and values, bfloat16, the scratch index included
    assert shape.bytes(torch.bfloat16) == 32 * per_row
    assert rows_that_fit(shape, torch.bfloat16, 10 * 2**30) == 32  # plenty: all rows
    assert rows_that_fit(shape, torch.bfloat16, int(10 * per_row / CACHE_MEMORY_SHARE)) == 10
    assert rows_that_fit(shape, torch.bfloat16, 0) == 1  # never none
