"""The process's life: starting -> ready -> draining, or failed. Read by /readyz and by the routes."""

from __future__ import annotations

import enum
import time


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

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def mark_ready(self) -> None:
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY

    def begin_drain(self, timeout_s: float) -> None:
        if self.phase in (Phase.STARTING, Phase.READY):
            self.phase = Phase.DRAINING
            self.drain_deadline = time.monotonic() + timeout_s

    def fail(self, reason: str) -> None:
        self.phase = Phase.FAILED
        self.failure = reason
