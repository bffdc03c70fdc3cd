"""The model worker core: one model step at a time, forever, in the model thread.

Each step: take new and cancelled requests from a thread-safe inbox, let the scheduler plan, prefill the
newcomers, decode one token for every running row, retire rows whose output ended, run the device work
other threads handed in (`StepWork`: the mask decoder's, for outputs parsed off this thread), then post
everything that happened to the event loop in one call. Turning tokens into text and parsing it happen
elsewhere (app.serving), so a step's time does not grow with them.

Faults stay with their request: a step that raises is retried one request at a time, so only the
request that fails alone is failed; out of memory on a prefill puts the newcomers back in line and
prefills fewer per step from then on; an error that leaves the device unusable stops the loop and fails
every request (the process then exits so the orchestrator restarts it).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from app.engine.model_thread import ModelThread
from app.engine.observer import EngineObserver
from app.engine.scheduler import Scheduler, Sequence
from app.engine.step_work import StepWork
from app.errors import InferenceFailed, ShuttingDown

logger = logging.getLogger(__name__)


class StepRunner(Protocol):
    """The model side of a step (`app.engine.runner.ModelStepRunner`, or a fake in tests)."""

    feature_cache_hits: int  # a running count, read after each prefill

    @property
    def rows(self) -> int: ...  # rows of its KV cache: the most requests that can run together

    def prefill(self, seqs: list[Sequence]) -> list[int]: ...
    def decode(self, seqs: list[Sequence], width: int) -> list[int]: ...
    def decode_alone(self, seq: Sequence) -> int: ...
    def release(self, seq: Sequence) -> None: ...
    def recover_memory(self) -> None: ...


T = TypeVar("T")

@dataclass
class StepEvents:
    """What one step did, posted to the event loop in one call."""

    started: list[Sequence] = field(default_factory=list)
    tokens: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, BaseException]] = field(default_factory=list)
    fatal: BaseException | None = None

    def __bool__(self) -> bool:
        return bool(self.started or self.tokens or self.finished or self.failed or self.fatal)


class _Fatal(Exception):
    pass


def _one_each(seqs: list[Sequence], results: list[T]) -> list[T]:
    """`results` if there is exactly one per request: a runner that loses or adds one is a bug."""
    if len(results) != len(seqs):
        raise RuntimeError(f"{len(results)} results for {len(seqs)} requests")
    return results


_WAKE = object()
_STOP = object()
_ABORT = object()


@dataclass(frozen=True)
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: StepRunner, post: Callable[[StepEvents], None],
                 observer: EngineObserver, is_oom: Callable[[BaseException], bool],
                 is_fatal: Callable[[BaseException], bool], work: Iterable[StepWork[Any, Any]] = ()):
        self.scheduler = scheduler
        self.runner = runner
        self.work = list(work)
        for item in self.work:
            item.attach(self.wake)
        self.post = post
        self.observer = observer
        self.is_oom = is_oom
        self.is_fatal = is_fatal
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._running: Future[None] | None = None  # the loop, once started: done when it returns
        # When the worker last finished a step or went idle: a stuck worker stops moving it.
        self.last_progress = time.monotonic()
        self.working = False
        self._events = StepEvents()

    # Called from other threads ---------------------------------------------------------------------
    def start(self, on: ModelThread | None = None) -> None:
        """Run the loop on `on` (the thread that loaded the model: see app.engine.model_thread), where it
        stays until stopped, or else on a model thread of its own that ends with the loop."""
        thread = on or ModelThread(name="model-worker")
        self._running = thread.submit(self._run)
        if on is None:
            thread.close()

    def submit(self, seq: Sequence) -> None:
        self._inbox.put(seq)

    def call_between_steps(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` in the worker after the step in progress and before the next one (at once when idle):
        for changes to the model's state that a step must never see half done (an adapter's slot)."""
        future: Future[T] = Future()
        self._inbox.put(_Call(fn, future))
        return future

    def wake(self) -> None:
        """Look at cancellations now (they are flags on the requests, read when a step is planned), and
        at device work handed in."""
        self._inbox.put(_WAKE)

    def abort(self) -> None:
        """Drop every request (their callers were answered already) and keep running."""
        self._inbox.put(_ABORT)

    def stop(self, timeout_s: float) -> None:
        self._inbox.put(_STOP)
        if self._running is not None:
            futures.wait([self._running], timeout_s)

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """Take what is in the inbox and step until nothing is left, in the calling thread; the number
        of steps. For deterministic drivers (tests, in-process benchmarks) that never `start()`."""
        steps = 0
        while steps < max_steps:
            self._drain_inbox()
            if self.idle or not self._guarded_step():
                break
            steps += 1
        return steps

    def step_once(self) -> bool:
        """One step in the calling thread (see `run_until_idle`); False once the device failed."""
        self._drain_inbox()
        return self.idle or self._guarded_step()

    @property
    def idle(self) -> bool:
        """No request waiting or running, and no device work handed in."""
        return self.scheduler.idle and not any(work.pending for work in self.work)

    def stalled_for(self) -> float:
        """Seconds the worker has spent in its current step (0 when idle or between steps)."""
        return time.monotonic() - self.last_progress if self.working else 0.0

    # The worker thread -----------------------------------------------------------------------------
    def _drain_inbox(self, block: bool = False) -> bool:
        """Take every waiting message (blocking for the first one if asked); False on a stop."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            self._take(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox(block=self.idle):
                    return
                if not self.idle and not self._guarded_step():
                    return
        finally:
            for work in self.work:
                work.fail_pending(ShuttingDown("the server shut down before this output was finished"))

    def _guarded_step(self) -> bool:
        self.working = True
        self.last_progress = time.monotonic()
        try:
            self._step()
        except _Fatal as fatal:
            self._fail_everything(fatal.__cause__ or fatal)
            return False
        finally:
            self.working = False
            self.last_progress = time.monotonic()
        return True

    def _take(self, item: object) -> None:
        if isinstance(item, Sequence):
            self.scheduler.add(item)
        elif isinstance(item, _Call):
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn())
                except Exception as exc:  # handed to the caller
                    item.future.set_exception(exc)
        elif item is _ABORT:
            for seq in self.scheduler.all_requests():
                self.scheduler.fail(seq)
                self.runner.release(seq)

    def _step(self) -> None:
        plan = self.scheduler.plan()
        for seq in plan.dropped:
            self.runner.release(seq)
        finished: list[Sequence] = []
        if plan.admitted:
            now = time.monotonic()
            for seq in plan.admitted:
                seq.admitted_at = now
            # They hold a row now: their queue slots go back before the (possibly long) prefill runs.
            self.post(StepEvents(started=list(plan.admitted)))
            self._prefill(plan.admitted, finished)
        if plan.decode:
            self._decode(plan.decode, finished)
        self._events.finished.extend(finished)
        for work in self.work:
            try:
                work.run(self.is_fatal)
            except Exception as exc:  # only what leaves the device unusable comes out
                raise _Fatal from exc
        self.observer.running(len(self.scheduler.running))
        events, self._events = self._events, StepEvents()
        if events:
            self.post(events)

    def _guard(self, exc: BaseException) -> None:
        if self.is_fatal(exc):
            raise _Fatal from exc

    def _record(self, seqs: list[Sequence], tokens: list[int], finished: list[Sequence]) -> None:
        now = time.monotonic()
        for seq in self.scheduler.update(seqs, tokens):
            seq.finished_at = now
            finished.append(seq)
            self.runner.release(seq)
        by_label: dict[tuple[str, str], int] = {}
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.streams and seq.finish_reason != "stop" and seq.cancel_reason is None:
                self._events.tokens.append((seq, [token]))  # a stop token is not part of the output
            labels = (seq.label, seq.adapter)
            by_label[labels] = by_label.get(labels, 0) + 1
        for (label, adapter), count in by_label.items():
            self.observer.tokens(label, adapter, count)

    def _prefill(self, seqs: list[Sequence], finished: list[Sequence]) -> None:
        started = time.perf_counter()
        hits = self.runner.feature_cache_hits
        try:
            tokens = _one_each(seqs, self.runner.prefill(seqs))
        except Exception as exc:
            self._guard(exc)
            self._prefill_failed(seqs, exc, finished)
            return
        now = time.monotonic()
        self.observer.step("prefill", len(seqs), time.perf_counter() - started)
        self.observer.feature_cache_hits(self.runner.feature_cache_hits - hits)
        for seq in seqs:
            seq.first_token_at = now
            self.observer.first_token(now - seq.submitted_at)
        self._record(seqs, tokens, finished)

    def _prefill_failed(self, seqs: list[Sequence], exc: Exception, finished: list[Sequence]) -> None:
        if self.is_oom(exc):
            self.runner.recover_memory()
            if len(seqs) > 1:
                budget = max(1, sum(seq.prompt_length for seq in seqs) // 2)
                self.scheduler.prefill_token_budget = min(self.scheduler.prefill_token_budget, budget)
                self.scheduler.requeue(seqs)
                logger.warning("out of memory prefilling %d requests; at most %d prompt tokens per step now",
                               len(seqs), self.scheduler.prefill_token_budget)
                return
            self._fail(seqs[0], exc, "the model ran out of memory on this request alone")
            return
        if len(seqs) > 1:
            logger.warning("a prefill of %d requests failed (%r); retrying one at a time", len(seqs), exc)
            for seq in seqs:
                self._prefill([seq], finished)
            return
        self._fail(seqs[0], exc, "the model failed on this request")

    def _decode(self, seqs: list[Sequence], finished: list[Sequence]) -> None:
        started = time.perf_counter()
        try:
            tokens = _one_each(seqs, self.runner.decode(seqs, self.scheduler.decode_width))
        except Exception as exc:
            self._guard(exc)
            self._decode_apart(seqs, exc, finished)
            return
        self.observer.step("decode", len(seqs), time.perf_counter() - started)
        self._record(seqs, tokens, finished)

    def _decode_apart(self, seqs: list[Sequence], exc: Exception, finished: list[Sequence]) -> None:
        """A decode step failed: run each row alone, fail only the rows that fail alone."""
        logger.warning("a decode step over %d rows failed (%r); running its rows one at a time",
                       len(seqs), exc)
        if self.is_oom(exc):
            self.runner.recover_memory()
            self.scheduler.shrink(max(1, len(seqs) // 2))
            logger.warning("out of memory decoding %d rows; at most %d rows from now on", len(seqs),
                           self.scheduler.rows_in_effect)
        for seq in seqs:
            try:
                token = self.runner.decode_alone(seq)
            except Exception as alone:
                self._guard(alone)
                self._fail(seq, alone, "the model failed on this request")
                continue
            self._record([seq], [token], finished)

    def _fail(self, seq: Sequence, exc: BaseException, message: str) -> None:
        logger.error("%s (request %d)", message, seq.request_id, exc_info=exc)
        self.scheduler.fail(seq)
        self.runner.release(seq)
        self._events.failed.append((seq, InferenceFailed(message)))

    def _fail_everything(self, exc: BaseException) -> None:
        logger.critical("the model worker failed and cannot recover: %r", exc)
        for seq in self.scheduler.all_requests():
            self.scheduler.fail(seq)
        self._events.fatal = exc
        events, self._events = self._events, StepEvents()
        self.post(events)
