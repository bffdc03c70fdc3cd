"""Which requests run in the next model step: pure bookkeeping, no torch, no threads.

The engine's unit of work is one model step. Before each step the scheduler drops requests that were
cancelled (client gone, deadline passed), admits waiting requests into free rows of the KV cache (their
prefill runs this step), and lists the running rows that decode one token. After the step, `update`,
the pair of `plan`, appends each row's token and retires the rows whose own output ended with it (a stop
token, or their own `max_new_tokens`), freeing them for waiting requests at once.

Rows are the KV cache's slots. A newcomer takes the lowest free row, so running rows stay packed at the
bottom and a decode step covers rows `[0, decode_width)` with few holes.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from app.engine.sampling_params import GREEDY, SamplingParams


class State(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    DROPPED = "dropped"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it. `payload` is the runner's input, opaque here."""

    prompt_length: int
    max_new_tokens: int
    stop_tokens: frozenset[int]
    payload: Any = None  # the runner's input
    label: str = ""  # for metrics: the endpoint it came from
    submitted_at: float = 0.0  # time.monotonic() when it reached the engine
    # Whether someone reads its tokens as they come (streaming): only then does every step post them to
    # the event loop; others are woken once, when they finish.
    streams: bool = False
    sampling: SamplingParams = GREEDY  # how its tokens are chosen
    adapter: str = ""  # for metrics: the LoRA adapter it runs with ("" for the base)
    # Set by the worker (time.monotonic()): when it got a row, when its prefill produced the first token,
    # and when its last token was computed. For traces and latency metrics.
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    request_id: int = field(default_factory=lambda: next(_ids))
    state: State = State.WAITING
    row: int | None = None
    # Tokens computed for this request, a final stop token included (it is not part of the output).
    computed: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_new_tokens)
    # Set from another thread to ask the scheduler to drop this request at the next step.
    cancel_reason: str | None = None

    @property
    def output_tokens(self) -> list[int]:
        """The generated tokens without the final stop token."""
        if self.finish_reason == "stop":
            return self.computed[:-1]
        return list(self.computed)

    @property
    def next_position(self) -> int:
        """Cache index where the last computed token's keys and values go when it is fed back."""
        return self.prompt_length + len(self.computed) - 1

    @property
    def done(self) -> bool:
        return self.state in (State.FINISHED, State.DROPPED)


@dataclass(frozen=True)
class StepPlan:
    admitted: list[Sequence]  # newly given a row: prefill this step (each yields its first token)
    decode: list[Sequence]  # running rows that feed their last token back and get the next one
    dropped: list[Sequence]  # cancelled: removed from the queue or their row freed


class Scheduler:
    """Waiting and running requests over `rows` KV-cache rows.

    `prefill_token_budget` bounds how many prompt tokens one step may prefill (its activation memory,
    and how long running rows wait for their next token); at least one request is admitted per step
    whatever its length, so none waits forever.
    """

    def __init__(self, rows: int, prefill_token_budget: int):
        if rows < 1:
            raise ValueError(f"rows must be >= 1; got {rows}")
        self.rows = rows
        self.rows_in_effect = rows
        self.prefill_token_budget = max(1, prefill_token_budget)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}
        self._free: list[int] = list(range(rows))  # a heap: the lowest free row first

    # Intake ----------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {seq.max_new_tokens}")
        seq.state = State.WAITING
        self.waiting.append(seq)

    # Planning --------------------------------------------------------------------------------------
    def plan(self) -> StepPlan:
        dropped = self._drop_cancelled()
        decode = [seq for _, seq in sorted(self.running.items())]
        admitted = self._admit()
        return StepPlan(admitted=admitted, decode=decode, dropped=dropped)

    def _drop_cancelled(self) -> list[Sequence]:
        dropped = [seq for seq in self.waiting if seq.cancel_reason is not None]
        if dropped:
            self.waiting = collections.deque(seq for seq in self.waiting if seq.cancel_reason is None)
        for seq in [seq for seq in self.running.values() if seq.cancel_reason is not None]:
            self._free_row(seq)
            dropped.append(seq)
        for seq in dropped:
            seq.state = State.DROPPED
        return dropped

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.prefill_token_budget
        while self.waiting and len(self.running) < self.rows_in_effect and self._free:
            seq = self.waiting[0]
            if admitted and seq.prompt_length > budget:
                break
            self.waiting.popleft()
            budget -= seq.prompt_length
            seq.row = heapq.heappop(self._free)
            seq.state = State.RUNNING
            self.running[seq.row] = seq
            admitted.append(seq)
        return admitted

    # After the step --------------------------------------------------------------------------------
    def update(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Append the token this step computed for each of `seqs`; the ones that finished with it (their
        rows are free now)."""
        finished = []
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.state is not State.RUNNING:
                raise RuntimeError(f"request {seq.request_id} is {seq.state.value}, not running")
            seq.computed.append(token)
            if token in seq.stop_tokens:
                seq.finish_reason = "stop"
            elif len(seq.computed) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            else:
                continue
            seq.state = State.FINISHED
            self._free_row(seq)
            finished.append(seq)
        return finished

    def fail(self, seq: Sequence) -> None:
        """The runner could not compute `seq` (its own fault): free its row; the caller answers it."""
        if seq.state is State.RUNNING:
            self._free_row(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.state = State.DROPPED

    def requeue(self, seqs: Iterable[Sequence]) -> None:
        """Give admitted requests their rows back and put them first in line (their prefill failed for
        want of memory); nothing of theirs was computed."""
        back = []
        for seq in seqs:
            if seq.state is State.RUNNING:
                self._free_row(seq)
            seq.computed.clear()
            seq.state = State.WAITING
            back.append(seq)
        self.waiting.extendleft(reversed(back))

    def shrink(self, rows: int) -> None:
        """Run at most `rows` requests from now on (memory is short); running rows are left alone."""
        self.rows_in_effect = max(1, min(self.rows, rows))

    def _free_row(self, seq: Sequence) -> None:
        assert seq.row is not None
        del self.running[seq.row]
        heapq.heappush(self._free, seq.row)
        seq.row = None

    # State -----------------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def decode_width(self) -> int:
        """Rows a decode step must cover: every running row lies below this."""
        return max(self.running) + 1 if self.running else 0

    def all_requests(self) -> list[Sequence]:
        return [*self.running.values(), *self.waiting]
