"""Per-row values that a step reads, preallocated once: one column per fact, one entry per KV-cache row.

A running row's entries are written when the row is admitted and when a token is recorded; a row nobody
runs holds each column's idle value, set at start and again whenever a row is released. So a decode step
can cover rows 0..w-1 with holes among them, and a CUDA graph captured for more rows than run reads idle
rows there, without anything being filled per step.

Python writes the host copy (numpy views: a scalar write costs ~0.1 us, a torch index ~5 us); a step and
the CUDA graphs captured for it read the device copy, slices of the same preallocated tensors. On CUDA the
host copy is pinned and `upload(width)` copies rows 0..width-1 of every column in one asynchronous copy
per dtype before a step; on the CPU the two copies are the same tensors and `upload` does nothing.

Adding a per-row fact (an adapter slot, say) is one more `Column` where the table is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Column:
    name: str
    dtype: torch.dtype  # torch.long or torch.float32
    idle: float  # the value of a row nobody runs


class RowTable:
    def __init__(self, rows: int, columns: Iterable[Column], device: torch.device):
        self.rows = rows
        self.device = device
        self.columns = {column.name: column for column in columns}
        # Columns of one dtype share one (rows, columns) tensor: rows 0..w-1 of all of them are contiguous,
        # so one copy per dtype uploads them.
        self._dtypes = sorted({column.dtype for column in self.columns.values()}, key=str)
        names = {dtype: [c.name for c in self.columns.values() if c.dtype == dtype] for dtype in self._dtypes}
        self._host: dict[torch.dtype, torch.Tensor] = {}
        self._device: dict[torch.dtype, torch.Tensor] = {}
        self._host_columns: dict[str, np.ndarray] = {}
        self._device_columns: dict[str, torch.Tensor] = {}
        self._idle: dict[torch.dtype, torch.Tensor] = {}
        on_gpu = device.type == "cuda"
        for dtype in self._dtypes:
            idle = torch.tensor([self.columns[name].idle for name in names[dtype]], dtype=dtype)
            host = idle.expand(rows, len(names[dtype])).clone()
            self._host[dtype] = host.pin_memory() if on_gpu else host
            self._device[dtype] = host.to(device) if on_gpu else self._host[dtype]
            self._idle[dtype] = idle
            for i, name in enumerate(names[dtype]):
                self._host_columns[name] = self._host[dtype][:, i].numpy()
                self._device_columns[name] = self._device[dtype][:, i]

    def host(self, name: str) -> np.ndarray:
        """The column as Python writes it (rows,)."""
        return self._host_columns[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        """The column as a step reads it (rows,), on the device: slice it to the rows a step covers."""
        return self._device_columns[name]

    def write(self, row: int, **values: float) -> None:
        for name, value in values.items():
            self._host_columns[name][row] = value

    def release(self, rows: Sequence[int]) -> None:
        """Put `rows` back at every column's idle value."""
        for dtype in self._dtypes:
            self._host[dtype][list(rows)] = self._idle[dtype]

    def upload(self, width: int) -> None:
        """Make rows 0..width-1 on the device what the host holds (CUDA only; the CPU shares them).

        The copy is asynchronous: the host must not write those rows again before the step that reads them
        has run. Every step ends by reading its tokens back (a synchronisation), so none does."""
        if self.device.type != "cuda":
            return
        for dtype in self._dtypes:
            self._device[dtype][:width].copy_(self._host[dtype][:width], non_blocking=True)
