"""Device work that other threads hand the model thread, run once per step for everyone who asked.

The engine's core runs every model step on the model thread (app.engine.model_thread says why). Work that
is not a step but needs the device, such as decoding the masks of requests whose outputs were parsed off
that thread, comes here: callers submit items from any thread and get a future; the core runs all items
submitted since the last step in one call of `fn`, after that step's decode, so a step's time grows with
the device work only, never with parsing.

Faults stay with their items: a batch that raises is run again one item at a time, and only the items
that fail alone get the error; an error after which the device cannot be trusted goes to the core.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741


class StepWork(Generic[I, O]):
    def __init__(self, name: str, fn: Callable[[list[I]], list[O]]):
        self.name = name
        self._fn = fn
        self._lock = threading.Lock()
        self._pending: list[tuple[I, Future[O]]] = []
        self._wake: Callable[[], None] = lambda: None

    def attach(self, wake: Callable[[], None]) -> None:
        """Called by the core that runs this: `wake` makes it step soon."""
        self._wake = wake

    def submit(self, item: I) -> Future[O]:
        future: Future[O] = Future()
        with self._lock:
            self._pending.append((item, future))
        self._wake()
        return future

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def run(self, is_fatal: Callable[[BaseException], bool]) -> None:
        """Run everything submitted so far (in the model thread). Raises only errors that `is_fatal`."""
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self._run(batch, is_fatal)

    def _run(self, batch: list[tuple[I, Future[O]]], is_fatal: Callable[[BaseException], bool]) -> None:
        try:
            results = self._fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if is_fatal(exc):
                self.fail([future for _, future in batch], exc)
                raise
            if len(batch) > 1:
                for one in batch:
                    self._run([one], is_fatal)
                return
            logger.error("%s failed for one request", self.name, exc_info=exc)
            self.fail([batch[0][1]], exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.set_running_or_notify_cancel():
                future.set_result(result)

    def fail_pending(self, exc: BaseException) -> None:
        """Answer everything not run yet with `exc` (the core is stopping or has failed)."""
        with self._lock:
            batch, self._pending = self._pending, []
        self.fail([future for _, future in batch], exc)

    @staticmethod
    def fail(futures: list[Future[O]], exc: BaseException) -> None:
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
