"""One thread for all of the model's work: loading, graph capture, warm-up and the engine's steps.

Why one: torch on the CPU runs its parallel ops on an OpenMP team that belongs to the thread calling
them. A second thread calling parallel ops (say, the model loaded in one thread and stepped in another)
gets a team of its own; with more OpenMP threads than cores, libgomp stops spinning between ops and puts
its threads to sleep, so every small op of a decode step pays a wake-up. Measured on 2 cores with the
`bench` preset, 4 requests in flight through the engine: decode step 10 ms and 2.0 cores used when one
thread did everything, 14 ms and 1.5 cores when another thread had run parallel ops first. On CUDA it
also keeps graph capture and replay in the same thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_CLOSE = object()


class ModelThread:
    """A daemon thread that runs submitted calls one after another, in order. A daemon, so that a call
    that never returns (a stuck device) cannot keep the process from exiting."""

    def __init__(self, name: str = "model") -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((future, fn, args))
        return future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the model thread, awaited from the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        """Stop once the calls submitted so far have run."""
        self._calls.put(_CLOSE)

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is _CLOSE:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who decides
                future.set_exception(exc)
