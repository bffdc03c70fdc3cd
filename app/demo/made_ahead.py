"""Training batches made ahead of the step that uses them, in processes of their own.

Drawing a scene is Python and PIL: in the tower's phase, 32 scenes a step took 0.15 s of a 0.35 s step on
one thread here, and a whole-model step's batch 0.06 s of ~1 s. Made in another process they cost the
training process little while a core is free. Batch `step` depends on the seed and the step only
(`BatchMaker`), so the items, their order and therefore the trained weights are the same with or without.
"""

from __future__ import annotations

import ctypes
import io
import os
import pickle
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

T = TypeVar("T")

# Items waiting per worker: enough to ride out a slow scene, few enough to keep memory small (a tower
# step's 32 images are ~19 MB).
_AHEAD = 4


class _TensorsAsArrays(pickle.Pickler):
    """Pickles each plain tensor as the numpy array over its memory. The loader's own way hands every
    tensor over as a shared-memory file of its own, and a tower step's item holds 225 of them (seven probe
    targets per scene): measured over 30 such items, that cost the worker 0.29 s of CPU an item (0.15 s of
    it drawing the scenes) and the training process 0.08 s; pickled so, 0.18 s and 0.026 s."""

    def reducer_override(self, obj: object) -> Any:
        if type(obj) is torch.Tensor and not obj.requires_grad and obj.dtype != torch.bfloat16:
            return torch.from_numpy, (np.ascontiguousarray(obj.numpy()),)
        return NotImplemented


def _packed(item: object) -> bytes:
    buffer = io.BytesIO()
    _TensorsAsArrays(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(item)
    return buffer.getvalue()


class _Steps(Dataset[bytes]):
    def __init__(self, make: Callable[[int], object], count: int) -> None:
        self.make, self.count = make, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, step: int) -> bytes:
        return _packed(self.make(step))


def _as_is(item: Any) -> Any:  # with batch_size=None, one item at a time
    return item


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_with_the_trainer(parent: int) -> None:
    """Runs first in each worker. Killed (a SIGTERM or SIGKILL), the training process runs no `finally`,
    and a worker left behind would not end on its own: it waits forever on its result pipe's feeder
    thread. Linux kills it with its parent instead."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def made_ahead(make: Callable[[int], T], count: int, workers: int) -> Iterator[T]:
    """`make(0)`, `make(1)`, ... `make(count - 1)` in order, made by `workers` processes ahead of the
    caller (0: by the caller, when asked for). The workers end with the iteration: at its end, when an
    item fails (its error raised here), or when the caller closes or drops it; and, on Linux, with the
    calling process when it is killed."""
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, not {workers}")
    if workers == 0:
        return (make(step) for step in range(count))
    # Forked workers inherit `make` (nothing of it is pickled); each runs torch on one thread.
    parent = os.getpid()
    loader = DataLoader(_Steps(make, count), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_as_is, prefetch_factor=_AHEAD, multiprocessing_context="fork",
                        worker_init_fn=lambda _: _end_with_the_trainer(parent))
    return _unpacked(iter(loader))


def _unpacked(items: Iterator[bytes]) -> Iterator[T]:
    try:
        for item in items:
            yield pickle.loads(item)  # bytes our own worker pickled
    finally:
        # The loader's iterator ends its workers on its own only at the end or when collected, and a
        # traceback that holds it would keep them alive.
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
