"""Decode steps of fixed shapes, captured once as CUDA graphs and replayed every step.

A decode step on a GPU is launch-bound: hundreds of small kernels whose launches cost more than their
work. Captured as a CUDA graph, the whole step is one launch. A graph fixes its shapes, so steps are
grouped in row-count buckets (1, 2, 4, 8, 16, then every 8 up to the cache's rows): a step over `w`
rows runs the smallest bucket >= w, the extra rows idle at the scratch position. All graphs share one
memory pool (only one ever runs at a time), captured largest first so the smaller ones reuse its memory.

Without graphs (on the CPU, or with PALIGEMMA_CUDA_GRAPHS=false) the same step runs eagerly at the exact
width, since padding only costs there.

With LoRA adapters, each row's adapter slot is one more input of the step: a captured graph reads it from
its own buffer and adds every row's delta in the fixed-shape (dense) form (app.adapters.lora_linear), so
one graph per bucket serves any mix of adapters, and loading one never re-captures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.adapters.bank import AdapterBank, DecodeForm
from app.engine.step_model import StepModel

logger = logging.getLogger(__name__)


def graph_buckets(rows: int) -> list[int]:
    sizes = {size for size in (1, 2, 4, 8, 16) if size < rows}
    sizes.update(range(24, rows, 8))
    sizes.add(rows)
    return sorted(sizes)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logits: torch.Tensor


class DecodeGraphs:
    def __init__(self, step: StepModel, pad_token_id: int, adapters: AdapterBank | None = None,
                 eager_form: DecodeForm = "auto"):
        self.step = step
        self.pad_token_id = pad_token_id
        self.adapters = adapters
        self.eager_form = eager_form  # how eager steps add adapter deltas (AdapterBank.route)
        self.device = step.device
        self._graphs: dict[int, _Captured] = {}

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def capture(self, buckets: list[int], progress: Callable[[int, int, float], None] | None = None) -> None:
        """Capture a graph per bucket; `progress(done, total, seconds)` after each one."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for done, size in enumerate(sorted(buckets, reverse=True), start=1):
            tokens = torch.full((size,), self.pad_token_id, dtype=torch.long, device=self.device)
            positions = torch.full((size,), self.step.scratch, dtype=torch.long, device=self.device)
            slots = torch.zeros((size,), dtype=torch.long, device=self.device)
            # Run it eagerly first on a side stream: lazy initialisation (cuBLAS handles, kernel choice)
            # must not happen inside the capture.
            side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._fixed_step(tokens, positions, slots)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._fixed_step(tokens, positions, slots)
            self._graphs[size] = _Captured(graph, tokens, positions, slots, logits)
            if progress is not None:
                progress(done, len(buckets), time.perf_counter() - started)
        torch.cuda.synchronize(self.device)

    def discard(self) -> None:
        self._graphs.clear()

    def _fixed_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self.adapters is not None:
            self.adapters.route_fixed(slots)
        return self.step.decode(tokens, positions)

    def run(self, tokens: list[int], positions: list[int], slots: list[int] | None = None) -> torch.Tensor:
        """Decode rows 0..len(tokens)-1, row i with adapter slot `slots[i]` (default: the base);
        (len(tokens), vocab) logits."""
        width = len(tokens)
        slots = slots if slots is not None else [0] * width
        bucket = next((size for size in sorted(self._graphs) if size >= width), None)
        new_tokens = torch.tensor(tokens, dtype=torch.long)
        new_positions = torch.tensor(positions, dtype=torch.long)
        if bucket is None:
            # Eager: attention reads only up to the furthest running row (idle rows sit at scratch).
            real = [p for p in positions if p != self.step.scratch]
            length = max(real) + 1 if real else 1
            if self.adapters is not None:
                self.adapters.route(slots, self.eager_form)
            return self.step.decode(new_tokens.to(self.device), new_positions.to(self.device), length=length)
        captured = self._graphs[bucket]
        captured.tokens.fill_(self.pad_token_id)
        captured.positions.fill_(self.step.scratch)
        captured.slots.zero_()
        captured.tokens[:width].copy_(new_tokens, non_blocking=True)
        captured.positions[:width].copy_(new_positions, non_blocking=True)
        captured.slots[:width].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        captured.graph.replay()
        return captured.logits[:width]
