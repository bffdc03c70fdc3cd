"""Decode steps of fixed shapes, captured once as CUDA graphs and replayed every step.

A decode step on a GPU is launch-bound: hundreds of small kernels whose launches cost more than their
work. Captured as a CUDA graph, the whole step is one launch. A graph fixes its shapes, so steps are
grouped in row-count buckets (1, 2, 4, 8, 16, then every 8 up to the cache's rows): a step over `w`
rows runs the smallest bucket >= w. Graphs are captured on slices of the runner's row table (its token
and position columns), so a replay reads whatever the table holds: rows past `w`, and holes below it,
are idle there (app/engine/rows.py). All graphs share one memory pool (only one ever runs at a time),
captured largest first so the smaller ones reuse its memory.

Without graphs (on the CPU, or with PALIGEMMA_CUDA_GRAPHS=false) the same step runs eagerly at the exact
width, since padding only costs there.

A captured graph is checked before it serves: `verify` replays each one and runs the eager step on the
same inputs; logits further apart than the dtype allows, or a different argmax in any row, and the runner
discards every graph and decodes eagerly (logged as an error, and shown in /v1/models and the
`paligemma_decode_graphs_failed` gauge). A graph that computes something else would otherwise serve
wrong tokens to every request, silently.

With LoRA adapters, each row's adapter slot is one more column of the row table: a captured graph reads
it there and adds every row's delta in the fixed-shape (dense) form (app.adapters.lora_linear), so one
graph per bucket serves any mix of adapters, and loading one never re-captures. An eager step routes the
rows by the host copy of the same column.

Capturing is a seam (`Capture`): by default a CUDA-graph capture; tests hand in a callable standing for
a graph, so that what runs around the graphs (buckets, the idle rows, the check) runs on a CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from app.adapters.bank import AdapterBank, DecodeForm
from app.engine.kv_cache import DecodeStep
from app.engine.rows import RowTable
from app.engine.step_model import StepModel

logger = logging.getLogger(__name__)

# A captured decode step over rows 0..bucket-1 as the row table holds them: replays it, returns its
# (bucket, vocab) logits.
Replay = Callable[[], torch.Tensor]
# Captures the decode step for a bucket of that many rows.
Capture = Callable[[int], Replay]

# How far a graph's logits may stray from the eager step's, as a share of their largest magnitude. The
# graph runs the same kernels, so it should agree to the last bit; this leaves room for a kernel that
# the capture picks differently, not for a wrong computation.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def disagreement(graph: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype) -> str | None:
    """How a graph's logits differ from the eager step's beyond what `dtype` allows, or None."""
    if not torch.isfinite(graph).all():
        return "the graph's logits are not all finite"
    tolerance = LOGIT_TOLERANCE.get(dtype, 2e-2)
    worst = float((graph - eager).abs().max() / eager.abs().max().clamp(min=1e-6))
    if worst > tolerance:
        return f"logits differ by {worst:.3g} of their largest magnitude (tolerance {tolerance:g})"
    rows = torch.nonzero(graph.argmax(dim=-1) != eager.argmax(dim=-1)).flatten().tolist()
    if rows:
        return f"the likeliest token differs in rows {rows}"
    return None


def graph_buckets(rows: int) -> list[int]:
    sizes = {size for size in (1, 2, 4, 8, 16) if size < rows}
    sizes.update(range(24, rows, 8))
    sizes.add(rows)
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, step: StepModel, table: RowTable, capture: Capture | None = None,
                 adapters: AdapterBank | None = None, eager_form: DecodeForm = "auto"):
        self.step = step
        self.table = table
        self.adapters = adapters
        self.eager_form = eager_form  # how eager steps add adapter deltas (AdapterBank.route)
        self.device = step.device
        self._capture = capture or self._capture_cuda
        self._replays: dict[int, Replay] = {}
        self._buckets: list[int] = []  # sorted
        self._pool: Any = None  # torch.cuda.graph_pool_handle(), once capturing
        self.failure: str | None = None  # why the graphs were discarded, when they were

    @property
    def captured(self) -> list[int]:
        return list(self._buckets)

    def capture(self, buckets: list[int], progress: Callable[[int, int, float], None] | None = None) -> None:
        """Capture a graph per bucket; `progress(done, total, seconds)` after each one."""
        started = time.perf_counter()
        for done, size in enumerate(sorted(buckets, reverse=True), start=1):
            self._replays[size] = self._capture(size)
            self._buckets = sorted(self._replays)
            if progress is not None:
                progress(done, len(buckets), time.perf_counter() - started)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _capture_cuda(self, size: int) -> Replay:
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self.table.upload(size)
        # Run it eagerly first on a side stream: lazy initialisation (cuBLAS handles, kernel choice) must
        # not happen inside the capture.
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fixed_step(size)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.fixed_step(size)

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay

    def fixed_step(self, size: int) -> torch.Tensor:
        """The decode step over rows 0..size-1 in the form a graph captures: every input read from the row
        table's device columns, adapter deltas in the dense form whatever the rows' mix."""
        if self.adapters is not None:
            self.adapters.route_fixed(self.table["adapter"][:size])
        return self.step.decode(self.table["token"][:size], DecodeStep(self.table["position"][:size]))

    def discard(self, reason: str | None = None) -> None:
        self._replays.clear()
        self._buckets = []
        self.failure = reason

    def verify(self) -> list[str]:
        """Each captured graph against the eager step on the same inputs (varied tokens, positions and, with
        adapters, slots in every row); what disagrees, by bucket. Only with no request running: it writes
        into the rows."""
        vocab = self.step.vocab_size
        length = self.step.scratch
        slots = self.adapters.max_adapters + 1 if self.adapters is not None else 1
        problems = []
        for bucket in self._buckets:
            rows = list(range(bucket))
            for row in rows:
                self.table.write(row, token=(17 + 7919 * row) % vocab, position=(5 + 37 * row) % length,
                                 adapter=row % slots)
            try:
                self.table.upload(bucket)
                graph = self._replays[bucket]()[:bucket].float().clone()
                eager = self.eager(bucket).float()  # whole rows, as the graph reads them
            finally:
                self.table.release(rows)
            problem = disagreement(graph, eager, self.step.dtype)
            if problem:
                problems.append(f"{bucket} rows: {problem}")
        return problems

    def eager(self, width: int, length: int | None = None) -> torch.Tensor:
        """The decode step over rows 0..width-1 without a graph; attention reads keys below `length`."""
        self.table.upload(width)
        if self.adapters is not None:
            self.adapters.route(self.table.host("adapter")[:width].tolist(), self.eager_form)
        target = DecodeStep(self.table["position"][:width], length)
        return self.step.decode(self.table["token"][:width], target)

    def run(self, width: int, length: int) -> torch.Tensor:
        """Decode rows 0..width-1 as the row table holds them; (width, vocab) logits. `length` is past
        every running row's position (an eager step reads only the keys below it; a graph, whole rows)."""
        bucket = next((size for size in self._buckets if size >= width), None)
        if bucket is None:
            return self.eager(width, length)
        self.table.upload(bucket)
        return self._replays[bucket]()[:width]
