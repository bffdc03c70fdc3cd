"""Runs the real server (`app.__main__.main`) with faults injected into the model, for fault tests.

The engine's model side is wrapped (through `main(runner_factory=...)`) so that it misbehaves on chosen
inputs, recognised by a uniform colour; a test picks the victim by the picture it sends:
- pure blue (0, 0, 255): the prefill that contains it takes FAULT_SLOW_S seconds (the worker is busy);
- pure green (0, 255, 0): every decode step with its row takes FAULT_STEP_S seconds (a long generation);
- pure black: a prefill containing it raises an ordinary error (its neighbours must be retried alone);
- pure red: a prefill containing it raises a CUDA-style error that leaves the worker unusable (the
  process must exit);
- pure yellow (255, 255, 0): the prefill that contains it hangs for FAULT_HANG_S seconds (a stuck worker).

FAULT_GC_S (seconds, off by default) runs a full garbage collection that often, so that what a
long-running server's collector finds eventually (a task left pending when its request ended, reported
as "Task was destroyed but it is pending!") a short test finds at once.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import torch

from app.engine.runner import ModelStepRunner, RowInput, RunnerConfig
from app.engine.scheduler import Sequence
from app.model.loader import LoadedModel

SLOW_S = float(os.environ.get("FAULT_SLOW_S", "2"))
STEP_S = float(os.environ.get("FAULT_STEP_S", "0.02"))
HANG_S = float(os.environ.get("FAULT_HANG_S", "6"))
GC_S = float(os.environ.get("FAULT_GC_S", "0"))
# What each uniform colour becomes after the checkpoint's normalisation ((v / 255 - 0.5) / 0.5).
_COLOURS = {"slow": (-1.0, -1.0, 1.0), "slow_steps": (-1.0, 1.0, -1.0), "fail": (-1.0, -1.0, -1.0),
            "fatal": (1.0, -1.0, -1.0), "hang": (1.0, 1.0, -1.0)}


def _kind(pixels: torch.Tensor) -> str | None:
    if float(pixels.flatten(1).std(dim=1).max()) > 1e-3:
        return None
    means = tuple(round(float(v), 2) for v in pixels.flatten(1).mean(dim=1))
    for kind, colour in _COLOURS.items():
        if means == colour:
            return kind
    return None


def _kinds(seqs: list[Sequence]) -> set[str | None]:
    return {_kind(item.pixel_values) for item in (seq.payload for seq in seqs) if isinstance(item, RowInput)}


class FaultyRunner(ModelStepRunner):
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        kinds = _kinds(seqs)
        if "fatal" in kinds:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if "fail" in kinds:
            raise ValueError("injected failure on a chosen input")
        if "slow" in kinds:
            time.sleep(SLOW_S)
        if "hang" in kinds:
            time.sleep(HANG_S)
        return super().prefill(seqs)

    def decode(self, seqs: list[Sequence], width: int) -> list[int]:
        if "slow_steps" in _kinds(seqs):
            time.sleep(STEP_S)
        return super().decode(seqs, width)


def faulty_runner(loaded: LoadedModel, config: RunnerConfig) -> FaultyRunner:
    return FaultyRunner(loaded, config)


def _collect_garbage_every(seconds: float) -> None:
    while True:
        time.sleep(seconds)
        gc.collect()


if __name__ == "__main__":
    from app.__main__ import main

    if GC_S > 0:
        threading.Thread(target=_collect_garbage_every, args=(GC_S,), name="gc", daemon=True).start()
    main(runner_factory=faulty_runner)
