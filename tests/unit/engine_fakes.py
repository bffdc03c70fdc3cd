"""A fake model side for the engine: scripted tokens, recorded steps, faults on demand. No torch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from app.engine.scheduler import Sequence


class DeviceBroken(RuntimeError):
    """Stands for a CUDA error that leaves the device unusable."""


class FakeOOM(RuntimeError):
    pass


@dataclass(frozen=True)
class Script:
    """What the fake model emits for one request, and how it misbehaves."""

    tokens: tuple[int, ...]  # emitted in order: tokens[0] by the prefill, then one per decode step
    fail_prefill: bool = False  # raises whenever this request is in a prefill
    fail_decode_at: int | None = None  # raises on the decode that would emit tokens[i]
    fatal_at: int | None = None  # raises DeviceBroken on the decode that would emit tokens[i]
    oom_prefill_with_more_than: int | None = None  # a prefill of more rows than this runs out of memory
    step_seconds: float = 0.0  # each step containing this request takes this long
    gate: threading.Event | None = None  # each step containing this request waits until this is set


@dataclass
class FakeRunner:
    """Implements `app.engine.core.StepRunner`."""

    feature_cache_hits: int = 0
    rows: int = 64  # the tests size the engine themselves
    prefills: list[list[int]] = field(default_factory=list)  # request ids per prefill
    decodes: list[tuple[list[int], int]] = field(default_factory=list)  # (request ids, width) per decode
    alone: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    recovered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stepping: threading.Event = field(default_factory=threading.Event)  # set when a step begins

    def _sleep(self, seqs: list[Sequence]) -> None:
        self.stepping.set()
        longest = max((seq.payload.step_seconds for seq in seqs), default=0.0)
        if longest:
            time.sleep(longest)
        for seq in seqs:
            if seq.payload.gate is not None:
                seq.payload.gate.wait()

    def prefill(self, seqs: list[Sequence]) -> list[int]:
        with self.lock:
            self.prefills.append([seq.request_id for seq in seqs])
        self._sleep(seqs)
        for seq in seqs:
            limit = seq.payload.oom_prefill_with_more_than
            if limit is not None and len(seqs) > limit:
                raise FakeOOM("out of memory")
            if seq.payload.fail_prefill:
                raise ValueError(f"bad input in request {seq.request_id}")
        return [seq.payload.tokens[0] for seq in seqs]

    def _next(self, seq: Sequence) -> int:
        index = len(seq.computed)
        if seq.payload.fatal_at == index:
            raise DeviceBroken("CUDA error: an illegal memory access was encountered")
        if seq.payload.fail_decode_at == index:
            raise ValueError(f"bad state in request {seq.request_id}")
        return seq.payload.tokens[index]

    def decode(self, seqs: list[Sequence], width: int) -> list[int]:
        assert all(seq.row is not None and seq.row < width for seq in seqs)
        with self.lock:
            self.decodes.append(([seq.request_id for seq in seqs], width))
        self._sleep(seqs)
        tokens = [self._next(seq) for seq in seqs]
        return tokens

    def decode_alone(self, seq: Sequence) -> int:
        with self.lock:
            self.alone.append(seq.request_id)
        return self._next(seq)

    def release(self, seq: Sequence) -> None:
        with self.lock:
            self.released.append(seq.request_id)

    def recover_memory(self) -> None:
        self.recovered += 1


class StepByHand:
    """Stands in for the model thread (`EngineFront.start(StepByHand())`): the engine's loop never runs by
    itself; the test steps it with `engine.core.step_once()` from the event loop's own thread, so what
    each step does is exact, whatever the machine's speed."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[None]:
        nothing: Future[None] = Future()
        nothing.set_result(None)
        return nothing
