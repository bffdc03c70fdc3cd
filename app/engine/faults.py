"""Which errors mean what: out of memory (retry smaller), or a device that cannot be trusted any more."""

from __future__ import annotations

import torch


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def is_unrecoverable(exc: BaseException) -> bool:
    """Errors after which the device cannot be trusted: CUDA leaves its context broken (device-side
    asserts, illegal memory accesses), so every later call would fail too; only a restart helps."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return "CUDA error" in str(exc)
