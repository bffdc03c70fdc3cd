"""Decode steps of fixed shapes, captured once as CUDA graphs and replayed every step.

A decode step on a GPU is launch-bound: hundreds of small kernels whose launches cost more than their
work. Captured as a CUDA graph, the whole step is one launch. A graph fixes its shapes, so steps are
grouped in row-count buckets (1, 2, 4, 8, 16, then every 8 up to the cache's rows): a step over `w`
rows runs the smallest bucket >= w, the extra rows idle at the scratch position. All graphs share one
memory pool (only one ever runs at a time), captured largest first so the smaller ones reuse its memory.

Without graphs (on the CPU, or with PALIGEMMA_CUDA_GRAPHS=false) the same step runs eagerly at the exact
width, since padding only costs there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.engine.kv_cache import DecodeStep
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
    logits: torch.Tensor


class DecodeGraphs:
    def __init__(self, step: StepModel, pad_token_id: int):
        self.step = step
        self.pad_token_id = pad_token_id
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
            # Run it eagerly first on a side stream: lazy initialisation (cuBLAS handles, kernel choice)
            # must not happen inside the capture.
            side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step.decode(tokens, DecodeStep(positions))
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.step.decode(tokens, DecodeStep(positions))
            self._graphs[size] = _Captured(graph, tokens, positions, logits)
            if progress is not None:
                progress(done, len(buckets), time.perf_counter() - started)
        torch.cuda.synchronize(self.device)

    def discard(self) -> None:
        self._graphs.clear()

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Decode rows 0..len(tokens)-1; (len(tokens), vocab) logits."""
        width = len(tokens)
        bucket = next((size for size in sorted(self._graphs) if size >= width), None)
        new_tokens = torch.tensor(tokens, dtype=torch.long)
        new_positions = torch.tensor(positions, dtype=torch.long)
        if bucket is None:
            # Eager: attention reads only up to the furthest running row (idle rows sit at scratch).
            real = [p for p in positions if p != self.step.scratch]
            length = max(real) + 1 if real else 1
            target = DecodeStep(new_positions.to(self.device), length)
            return self.step.decode(new_tokens.to(self.device), target)
        captured = self._graphs[bucket]
        captured.tokens.fill_(self.pad_token_id)
        captured.positions.fill_(self.step.scratch)
        captured.tokens[:width].copy_(new_tokens, non_blocking=True)
        captured.positions[:width].copy_(new_positions, non_blocking=True)
        captured.graph.replay()
        return captured.logits[:width]
