"""Runs the real server (`app.__main__.main`) with faults injected into the model, for fault tests.

The model misbehaves on chosen inputs, recognised by a uniform colour, so a test picks the victim by the
picture it sends:
- pure blue (0, 0, 255): the batch containing it takes FAULT_SLOW_S seconds longer (queues build up);
- pure black: the batch raises an ordinary error (the server must retry its neighbours one by one);
- pure red: the batch raises a CUDA-style error that leaves the worker unusable (the process must exit).
"""

from __future__ import annotations

import os
import time

import torch

from app.model.runner import ModelRunner

SLOW_S = float(os.environ.get("FAULT_SLOW_S", "2"))
# What each uniform colour becomes after the checkpoint's normalisation ((v / 255 - 0.5) / 0.5).
_COLOURS = {"slow": (-1.0, -1.0, 1.0), "fail": (-1.0, -1.0, -1.0), "fatal": (1.0, -1.0, -1.0)}


def _kind(pixels: torch.Tensor) -> str | None:
    if float(pixels.std()) > 1e-3 and float(pixels.flatten(1).std(dim=1).max()) > 1e-3:
        return None
    means = tuple(round(float(v), 2) for v in pixels.flatten(1).mean(dim=1))
    for kind, colour in _COLOURS.items():
        if means == colour:
            return kind
    return None


_original = ModelRunner.generate


def _faulty_generate(self, inputs):
    kinds = {_kind(item.pixel_values) for item in inputs}
    if "fatal" in kinds:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    if "fail" in kinds:
        raise ValueError("injected failure on a chosen input")
    if "slow" in kinds:
        time.sleep(SLOW_S)
    return _original(self, inputs)


ModelRunner.generate = _faulty_generate  # type: ignore[method-assign]

if __name__ == "__main__":
    from app.__main__ import main

    main()
