"""Many requests in one command (a folder run, an evaluation): at most N in flight, a progress bar on
stderr, and every failure kept to be listed at the end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from paligemma_client.errors import APIError, PaliGemmaError

T = TypeVar("T")
R = TypeVar("R")

PROGRESS_MODES = ("auto", "always", "never")


class Progress:
    """A one-line progress bar, redrawn in place (only where it was asked for or stderr is a terminal)."""

    WIDTH = 30

    def __init__(self, total: int, stream: IO[str], enabled: bool):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.done = self.failed = 0
        self.started = time.monotonic()

    @classmethod
    def shown(cls, total: int, stream: IO[str], mode: str) -> Progress:
        """A bar for `total` steps, drawn as `mode` (one of PROGRESS_MODES) says."""
        return cls(total, stream, mode == "always" or (mode == "auto" and stream.isatty()))

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if self.enabled:
            filled = self.WIDTH * self.done // max(self.total, 1)
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} "
                              f"failed {self.failed}  {time.monotonic() - self.started:.1f} s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")


async def run_bounded(items: Sequence[T], work: Callable[[T], Awaitable[bool]], concurrency: int,
                      progress: Progress) -> None:
    """Run `work` on every item, in order of the list, with at most `concurrency` running at once; each
    returns whether it succeeded (it reports its own failures), which the progress bar counts."""
    pending = list(reversed(items))

    async def worker() -> None:
        while pending:
            progress.advance(await work(pending.pop()))

    await asyncio.gather(*(worker() for _ in range(min(max(1, concurrency), len(items)))))
    progress.close()


@dataclass(frozen=True)
class Failure:
    """One request that got no answer: what it was for (an image) and why."""

    item: str
    error: str


async def collect_answers(jobs: Sequence[T], ask: Callable[[T], Awaitable[R]], name: Callable[[T], str],
                          concurrency: int, progress: Progress) -> tuple[dict[int, R], list[Failure]]:
    """`ask` for every job (bounded, with progress): the answers by the job's index, and the failures (a
    refused request, an unreachable server, an unreadable image, an answer `ask` found unusable)."""
    answers: dict[int, R] = {}
    failures: list[Failure] = []

    async def work(job: tuple[int, T]) -> bool:
        index, item = job
        try:
            answers[index] = await ask(item)
        except (PaliGemmaError, OSError, ValueError) as exc:
            failures.append(Failure(name(item), str(exc)))
            return False
        return True

    await run_bounded(list(enumerate(jobs)), work, concurrency, progress)
    return answers, failures


def error_fields(error: Exception) -> dict[str, Any]:
    """An exception as JSON: the server's error envelope for an `APIError`, else its type and message."""
    if isinstance(error, APIError):
        return {"status": error.status_code, "type": error.type, "message": error.message,
                "param": error.param, "request_id": error.request_id}
    return {"type": type(error).__name__, "message": str(error)}


def write_summary(stream: IO[str], total: int, what: str, failures: Sequence[Failure],
                  seconds: float) -> None:
    """`12 images in 3.4 s: 11 ok, 1 failed`, then one line per failure."""
    stream.write(f"{total} {what} in {seconds:.1f} s: {total - len(failures)} ok, {len(failures)} failed\n")
    for failure in sorted(failures, key=lambda f: (f.item, f.error)):
        stream.write(f"  {failure.item}: {failure.error}\n")
