"""An async batching queue in front of one model worker thread.

Requests take a slot at admission (before their image is decoded, so a burst over capacity costs
nothing), wait in a queue, and are handed to the worker in batches: a batch leaves when it is full, or
when its oldest request has waited `max_wait_s` for company. Requests that queued up while the worker
was busy leave together as soon as it is free, without waiting again. Requests whose deadline passed or
whose client left are dropped before the model runs. The model call runs in one dedicated thread; the
event loop never blocks on it.

A batch that raises is retried one request at a time, so one bad input cannot fail its neighbours;
an out-of-memory error halves the batch size in effect and splits the batch instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull, ShuttingDown

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int
    max_wait_s: float
    max_queue: int
    # Suggested client back-off for a 429, in seconds.
    retry_after_s: int = 1


class BatchObserver:
    """Hooks for metrics; the default does nothing so the batcher runs without them."""

    def queue_depth(self, depth: int) -> None: ...
    def batch_started(self, size: int, queue_waits: Sequence[float]) -> None: ...
    def batch_finished(self, size: int, seconds: float) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def rejected(self, reason: str) -> None: ...


@dataclass(eq=False)
class _Item(Generic[In, Out]):
    payload: In
    future: asyncio.Future[Out]
    deadline: float
    slot: Slot
    enqueued_at: float = field(default_factory=time.monotonic)
    started: bool = False


class Slot:
    """A place in the queue, taken at admission and held until the request is batched or abandoned."""

    def __init__(self, batcher: Batcher[Any, Any]):
        self._batcher = batcher
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._batcher._slot_released()


class Batcher(Generic[In, Out]):
    def __init__(
        self,
        run_batch: Callable[[list[In]], list[Out]],
        config: BatcherConfig,
        observer: BatchObserver | None = None,
        is_oom: Callable[[BaseException], bool] = lambda exc: False,
        is_fatal: Callable[[BaseException], bool] = lambda exc: False,
        on_fatal: Callable[[BaseException], None] = lambda exc: None,
        group_key: Callable[[In], float] | None = None,
    ):
        self._run_batch = run_batch
        self.config = config
        self._observer = observer or BatchObserver()
        self._is_oom = is_oom
        self._is_fatal = is_fatal
        self._on_fatal = on_fatal
        self._group_key = group_key
        self._queue: collections.deque[_Item[In, Out]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._slots_taken = 0
        self._accepting = True
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-worker")
        self._task: asyncio.Task[None] | None = None
        self._running: list[_Item[In, Out]] = []
        self._worker_free_since = 0.0
        self.batch_size_in_effect = config.max_batch_size
        self.fatal_error: BaseException | None = None

    # Admission -----------------------------------------------------------------------------------
    def reserve(self) -> Slot:
        if self.fatal_error is not None:
            raise NotReady("the model worker has failed and the process is restarting; retry shortly",
                           headers={"Retry-After": "5"})
        if not self._accepting:
            self._observer.rejected("shutting_down")
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self._slots_taken >= self.config.max_queue:
            self._observer.rejected("queue_full")
            raise QueueFull(
                f"the queue is full ({self.config.max_queue} requests waiting); retry after "
                f"{self.config.retry_after_s} s",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        self._slots_taken += 1
        return Slot(self)

    def _slot_released(self) -> None:
        self._slots_taken -= 1

    @property
    def depth(self) -> int:
        """Requests admitted and not yet handed to the worker (being prepared or queued)."""
        return self._slots_taken

    async def submit(self, slot: Slot, payload: In, timeout_s: float) -> Out:
        """Queue `payload` and wait for its result. Cancelling the caller abandons the request."""
        loop = asyncio.get_running_loop()
        item: _Item[In, Out] = _Item(payload, loop.create_future(), time.monotonic() + timeout_s, slot)
        self._queue.append(item)
        self._wakeup.set()
        self._observer.queue_depth(self.depth)
        try:
            remaining = item.deadline - time.monotonic()
            done, _ = await asyncio.wait({item.future}, timeout=max(remaining, 0))
            if done:
                return item.future.result()
            if not item.started:
                item.future.cancel()
                self._observer.dropped("timeout")
                raise DeadlineExceeded(
                    f"the request waited more than {timeout_s:g} s in the queue "
                    "(PALIGEMMA_REQUEST_TIMEOUT_S); the server is overloaded, retry later"
                )
            # Already on the model: its answer is moments away and the work is paid for.
            return await asyncio.shield(item.future)
        except asyncio.CancelledError:
            # The caller went away (client disconnected): if still queued, the worker will skip it.
            if not item.started and not item.future.done():
                item.future.cancel()
                self._observer.dropped("disconnected")
            raise
        finally:
            slot.release()
            self._observer.queue_depth(self.depth)

    # Batch loop -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop intake, let queued requests finish (up to the timeout), then stop the worker."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self.busy and time.monotonic() < deadline and self.fatal_error is None:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in (*self._running, *self._queue):
            if not item.future.done():
                item.future.set_exception(ShuttingDown("the server shut down before this request finished"))
        self._queue.clear()
        # A batch still on the model (drain timeout) cannot be interrupted; do not wait for it.
        self._worker.shutdown(wait=not self._running, cancel_futures=True)

    @property
    def busy(self) -> bool:
        """Whether any admitted request is still being prepared, queued or computed."""
        return bool(self._queue or self._slots_taken or self._running)

    async def _next_batch(self) -> list[_Item[In, Out]]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        leave_at = self._leave_at()
        while len(self._queue) < self.batch_size_in_effect:
            remaining = leave_at - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        batch = self._choose(self._live_queue())
        for item in batch:
            item.started = True
            item.slot.release()  # the slot bounds the queue; a running request no longer holds one
        return batch

    def _leave_at(self) -> float:
        """When the batch being formed leaves if it does not fill up first.

        Requests that arrived while the worker was busy have waited already: they leave at once with
        whatever gathered meanwhile. A request that found the worker idle waits up to `max_wait_s` for
        company. (Waiting only when other admitted requests were still being prepared was tried and
        measured: it cut 4-in-flight throughput by an eighth on the CPU benchmark, because clients that
        send their next request a few milliseconds apart then ride in separate batches.)
        """
        oldest = self._queue[0].enqueued_at
        if oldest < self._worker_free_since:
            return 0.0
        return oldest + self.config.max_wait_s

    def _live_queue(self) -> list[_Item[In, Out]]:
        """The queue without abandoned requests; those past their deadline are answered 504 here."""
        now = time.monotonic()
        live = []
        for item in self._queue:
            if item.future.done():  # abandoned (timed out or client left), already counted
                continue
            if now >= item.deadline:
                item.future.set_exception(
                    DeadlineExceeded("the request waited past PALIGEMMA_REQUEST_TIMEOUT_S; retry later")
                )
                self._observer.dropped("timeout")
                continue
            live.append(item)
        return live

    def _choose(self, live: list[_Item[In, Out]]) -> list[_Item[In, Out]]:
        """The next batch: the oldest request always, then the queued requests most like it.

        A batch runs as many decoding steps as its longest request, so mixing a 16-token caption with a
        256-token description makes the caption's row idle for 240 steps. When more requests wait than
        fit, those with the closest `group_key` (the token budget) join the oldest; every request still
        leaves once it is the oldest, so none waits forever.
        """
        size = self.batch_size_in_effect
        if len(live) > size and self._group_key is not None:
            key = self._group_key
            target = key(live[0].payload)
            rest = sorted(live[1:], key=lambda item: abs(key(item.payload) - target))  # stable: by age
            chosen = {id(item) for item in [live[0], *rest[: size - 1]]}
        else:
            chosen = {id(item) for item in live[:size]}
        batch = [item for item in live if id(item) in chosen]
        self._queue = collections.deque(item for item in live if id(item) not in chosen)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self._observer.queue_depth(self.depth)
            await self._run(loop, batch, first_attempt=True)
            if self.fatal_error is not None:
                return

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item[In, Out]],
                   first_attempt: bool = False) -> None:
        now = time.monotonic()
        # Retries are batches too (the histogram shows them) but their requests did not queue again.
        waits = [now - item.enqueued_at for item in batch] if first_attempt else []
        self._observer.batch_started(len(batch), waits)
        started = time.perf_counter()
        self._running = batch
        try:
            outputs = await loop.run_in_executor(self._worker, self._run_batch, [i.payload for i in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"the model returned {len(outputs)} results for {len(batch)} requests")
        except Exception as exc:
            await self._recover(loop, batch, exc)
            return
        finally:
            self._running = []
            self._worker_free_since = time.monotonic()
            self._observer.batch_finished(len(batch), time.perf_counter() - started)
        for item, output in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)

    async def _recover(self, loop: asyncio.AbstractEventLoop, batch: list[_Item[In, Out]],
                       exc: Exception) -> None:
        if self.fatal_error is not None:
            return
        if self._is_fatal(exc):
            self._die(batch, exc)
            return
        if self._is_oom(exc) and len(batch) > 1:
            self.batch_size_in_effect = max(1, len(batch) // 2)
            logger.warning("out of memory on a batch of %d; batch size now %d", len(batch),
                           self.batch_size_in_effect)
            half = len(batch) // 2
            await self._run(loop, batch[:half])
            await self._run(loop, batch[half:])
            return
        if len(batch) > 1:
            logger.warning("a batch of %d failed (%r); retrying one request at a time", len(batch), exc)
            for item in batch:
                await self._run(loop, [item])
            return
        item = batch[0]
        logger.error("inference failed for one request", exc_info=exc)
        if not item.future.done():
            item.future.set_exception(InferenceFailed("the model failed on this request"))

    def _die(self, batch: list[_Item[In, Out]], exc: BaseException) -> None:
        """The worker cannot run any more (e.g. a CUDA context error): fail everything, report it."""
        logger.critical("the model worker failed and cannot recover: %r", exc)
        self.fatal_error = exc
        self._accepting = False
        for item in (*batch, *self._queue):
            if not item.future.done():
                item.future.set_exception(
                    NotReady("the model worker failed; the process is restarting, retry shortly",
                             headers={"Retry-After": "5"}))
        self._queue.clear()
        self._on_fatal(exc)
