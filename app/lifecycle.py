"""The process's life: starting -> ready -> draining, or failed. Read by /readyz and by the routes."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable
from typing import TypeVar

from app.errors import ShuttingDown

T = TypeVar("T")


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says what is wrong and what to do (it is shown
    without a traceback)."""


class Phase(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.failure: str | None = None
        self.drain_deadline: float | None = None
        # Set when the drain begins, for what waits on a client rather than on the model (an upload).
        self.draining = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def mark_ready(self) -> None:
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY

    def begin_drain(self, timeout_s: float) -> None:
        """Called on the event loop (a signal handler hands it over: app.__main__)."""
        if self.phase in (Phase.STARTING, Phase.READY):
            self.phase = Phase.DRAINING
            self.drain_deadline = time.monotonic() + timeout_s
        self.draining.set()

    def fail(self, reason: str) -> None:
        self.phase = Phase.FAILED
        self.failure = reason


def shutting_down() -> ShuttingDown:
    """The answer to a request that was not admitted yet when the drain began."""
    return ShuttingDown("the server is shutting down; retry on another replica",
                        headers={"Retry-After": "1", "Connection": "close"})


async def unless_draining(work: Awaitable[T], draining: asyncio.Event) -> T:
    """`work`'s result, unless the drain begins first: then `work` is cancelled (and awaited, so that
    nothing is left pending) and ShuttingDown is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(draining.wait())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (task, watcher):
            waiting.cancel()
        # Shielded: our own cancellation (a client gone) must not leave the two pending either.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(asyncio.gather(task, watcher, return_exceptions=True))
    if task in done:
        return task.result()
    raise shutting_down()
