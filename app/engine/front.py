"""The engine's asyncio front, as the event loop sees it: admission, one future per request, deadlines, drain.

A request takes a slot at admission (before its image is decoded, so a burst over capacity costs
nothing: 429 at once); the slot is held while the request is prepared and while it waits for a KV-cache
row, and given back once the request starts running. The worker thread (`EngineCore`) does the model
work; what it reports comes back here through `call_soon_threadsafe` and settles the futures.

Deadlines and disconnects are watched here, on the event loop, so a client gets its 504 on time even
while the worker is busy; the request's row is freed at the worker's next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.engine.core import EngineCore, StepEvents, StepRunner
from app.engine.observer import EngineObserver, NullObserver
from app.engine.sampling_params import GREEDY, SamplingParams
from app.engine.scheduler import Scheduler, Sequence
from app.engine.step_work import StepWork
from app.errors import DeadlineExceeded, NotReady, QueueFull, ShuttingDown

if TYPE_CHECKING:
    from app.engine.model_thread import ModelThread

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int  # admitted requests not yet running (being prepared, or waiting for a row)
    prefill_token_budget: int
    retry_after_s: int = 1  # suggested client back-off for a 429


@dataclass(frozen=True)
class EngineRequest:
    prompt_length: int
    max_new_tokens: int
    payload: Any  # the runner's input
    label: str = ""  # metrics label (the endpoint)
    adapter: str = ""  # metrics label (the LoRA adapter; "" for the base)
    sampling: SamplingParams = GREEDY


@dataclass(frozen=True)
class Completion:
    tokens: list[int]  # generated tokens, without a final stop token
    computed: int  # tokens computed, the stop token included
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    # time.monotonic() when it reached the engine, got a row, had its first token, and ended.
    submitted_at: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


TokenCallback = Callable[[list[int]], None]


class Slot:
    """A place among the admitted requests, held until the request runs or is abandoned."""

    def __init__(self, engine: EngineFront):
        self._engine = engine
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._engine._slot_released()


@dataclass(eq=False)
class _Handle:
    seq: Sequence
    future: asyncio.Future[Completion]
    slot: Slot
    on_tokens: TokenCallback | None


class EngineFront:
    def __init__(self, runner: StepRunner, rows: int, stop_tokens: frozenset[int],
                 config: EngineConfig, observer: EngineObserver | None = None,
                 is_oom: Callable[[BaseException], bool] = lambda exc: False,
                 is_fatal: Callable[[BaseException], bool] = lambda exc: False,
                 on_fatal: Callable[[BaseException], None] = lambda exc: None,
                 work: Iterable[StepWork[Any, Any]] = ()):
        """`work`: device work other threads hand the model thread, run once per step (see StepWork)."""
        self.config = config
        self.stop_tokens = stop_tokens
        self.observer: EngineObserver = observer or NullObserver()
        self.scheduler = Scheduler(rows, config.prefill_token_budget)
        self.core = EngineCore(self.scheduler, runner, self._post, self.observer, is_oom, is_fatal, work)
        self._on_fatal = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[int, _Handle] = {}
        self._slots_taken = 0
        self._accepting = True
        self._aborted = False
        self.fatal_error: BaseException | None = None

    # Admission -------------------------------------------------------------------------------------
    def reserve(self, *, bounded: bool = True) -> Slot:
        """A place among the admitted requests, or the refusal (503 failed or draining, 429 full).
        `bounded=False` takes one beyond PALIGEMMA_MAX_QUEUE: the warm-up's, which no client waits on and
        which must run whatever the queue's size."""
        self.check_open()
        if bounded and self._slots_taken >= self.config.max_queue:
            self.observer.rejected("queue_full")
            raise QueueFull(
                f"the queue is full ({self.config.max_queue} requests waiting, PALIGEMMA_MAX_QUEUE); retry "
                f"after {self.config.retry_after_s} s",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        self._slots_taken += 1
        self.observer.queue_depth(self._slots_taken)
        return Slot(self)

    def check_open(self) -> None:
        """Refuse (503) while the worker is failed or the server drains; for work done before a slot."""
        if self.fatal_error is not None:
            raise NotReady("the model worker has failed and the process is restarting; retry shortly",
                           headers={"Retry-After": "5"})
        if not self._accepting:
            self.observer.rejected("shutting_down")
            raise ShuttingDown("the server is shutting down; retry on another replica",
                               headers={"Retry-After": "1"})

    def _slot_released(self) -> None:
        self._slots_taken -= 1
        self.observer.queue_depth(self._slots_taken)

    @property
    def depth(self) -> int:
        """Admitted requests not running yet (being prepared, or waiting for a row)."""
        return self._slots_taken

    @property
    def busy(self) -> bool:
        """Whether any admitted request is still being prepared, waiting or running."""
        return bool(self._slots_taken or self._handles)

    # Requests --------------------------------------------------------------------------------------
    async def submit(self, slot: Slot, request: EngineRequest, timeout_s: float,
                     on_tokens: TokenCallback | None = None) -> Completion:
        """Run `request` and wait for its completion. Cancelling the caller abandons the request."""
        submitted = time.monotonic()
        deadline = submitted + timeout_s
        if self._aborted or self.fatal_error is not None:
            slot.release()
            raise ShuttingDown("the server shut down before this request could run; retry on another replica")
        seq = Sequence(request.prompt_length, request.max_new_tokens, self.stop_tokens, request.payload,
                       request.label, submitted, streams=on_tokens is not None,
                       sampling=request.sampling, adapter=request.adapter)
        handle = _Handle(seq, asyncio.get_running_loop().create_future(), slot, on_tokens)
        self._handles[seq.request_id] = handle
        self.core.submit(seq)
        try:
            done, _ = await asyncio.wait({handle.future}, timeout=max(deadline - time.monotonic(), 0))
            if done:
                return handle.future.result()
            waited = not slot.released
            self._cancel(handle, "timeout")
            if waited:
                raise DeadlineExceeded(
                    f"the request waited more than {timeout_s:g} s for the model "
                    "(PALIGEMMA_REQUEST_TIMEOUT_S); the server is overloaded, retry later")
            raise DeadlineExceeded(
                f"the request did not finish within {timeout_s:g} s (PALIGEMMA_REQUEST_TIMEOUT_S); ask for "
                "fewer max_new_tokens or retry later")
        except asyncio.CancelledError:
            self._cancel(handle, "disconnected")  # the client went away: free its row
            raise
        finally:
            slot.release()
            self._handles.pop(seq.request_id, None)

    def _cancel(self, handle: _Handle, reason: str) -> None:
        if handle.future.done():
            return
        handle.future.cancel()
        handle.seq.cancel_reason = reason
        self.core.wake()
        self.observer.dropped(reason)

    # Events from the worker ------------------------------------------------------------------------
    def _post(self, events: StepEvents) -> None:
        """Called in the worker thread: hand the step's events to the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._settle, events)

    def _settle(self, events: StepEvents) -> None:
        now = time.monotonic()
        for seq in events.started:
            handle = self._handles.get(seq.request_id)
            if handle is not None:
                handle.slot.release()
                self.observer.queue_wait(now - seq.submitted_at)
        for seq, tokens in events.tokens:
            handle = self._handles.get(seq.request_id)
            if handle is not None and handle.on_tokens is not None and not handle.future.done():
                handle.on_tokens(tokens)
        for seq in events.finished:
            handle = self._handles.get(seq.request_id)
            if handle is not None and not handle.future.done():
                handle.future.set_result(Completion(
                    seq.output_tokens, len(seq.computed), seq.finish_reason or "length",
                    seq.prompt_length, seq.submitted_at, seq.admitted_at, seq.first_token_at,
                    seq.finished_at))
        for seq, error in events.failed:
            handle = self._handles.get(seq.request_id)
            if handle is not None and not handle.future.done():
                handle.future.set_exception(error)
        if events.fatal is not None:
            self._die(events.fatal)

    def _die(self, exc: BaseException) -> None:
        self.fatal_error = exc
        self._accepting = False
        self._fail_all(NotReady("the model worker failed; the process is restarting, retry shortly",
                                headers={"Retry-After": "5"}))
        self._on_fatal(exc)

    def _fail_all(self, error: Exception) -> None:
        for handle in list(self._handles.values()):
            if not handle.future.done():
                handle.future.set_exception(error)

    # Life ------------------------------------------------------------------------------------------
    def start(self, on: ModelThread | None = None) -> None:
        """Start taking requests; the worker loop runs on `on` if given (see EngineCore.start)."""
        self._loop = asyncio.get_running_loop()
        self.core.start(on)

    def stop_intake(self) -> None:
        self._accepting = False

    def abort(self, error: Exception) -> None:
        """Answer every admitted request with `error` now and drop them from the worker."""
        self._accepting = False
        self._aborted = True
        self._fail_all(error)
        self.core.abort()

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop intake, let admitted requests finish (up to the timeout), answer the rest 503, stop."""
        self.stop_intake()
        deadline = time.monotonic() + drain_timeout_s
        while self.busy and time.monotonic() < deadline and self.fatal_error is None:
            await asyncio.sleep(0.01)
        if self.busy:
            logger.warning("drain timeout: answering %d unfinished requests with 503", len(self._handles))
            self.abort(ShuttingDown("the server shut down before this request finished; retry on another "
                                    "replica", headers={"Retry-After": "1"}))
        # A step in progress cannot be interrupted; do not wait long for it.
        await asyncio.to_thread(self.core.stop, 2.0)

    def stalled_for(self) -> float:
        return self.core.stalled_for()

    async def between_steps(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the model's thread between two steps (EngineCore.call_between_steps)."""
        await asyncio.wrap_future(self.core.call_between_steps(fn))
