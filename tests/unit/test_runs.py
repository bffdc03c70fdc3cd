"""Many requests in one command (paligemma_client.runs): bounded concurrency, progress, failures kept."""

from __future__ import annotations

import asyncio
import io

from paligemma_client.errors import BadRequestError
from paligemma_client.runs import Failure, Progress, collect_answers, write_summary


def test_answers_are_kept_by_index_with_at_most_concurrency_in_flight_and_failures_listed():
    in_flight = peak = 0

    async def ask(job: int) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01 * (job % 3))
        in_flight -= 1
        if job == 4:
            raise BadRequestError(400, "invalid_image", "truncated", "image")
        if job == 7:
            raise FileNotFoundError(f"no such file: {job}.png")
        return f"answer {job}"

    stream = io.StringIO()
    progress = Progress.shown(10, stream, "always")
    answers, failures = asyncio.run(collect_answers(list(range(10)), ask, lambda job: f"{job}.png", 3, progress))
    assert answers == {i: f"answer {i}" for i in range(10) if i not in (4, 7)}
    assert sorted(failures, key=lambda f: f.item) == [
        Failure("4.png", "400 invalid_image: truncated (field: image)"),
        Failure("7.png", "no such file: 7.png")]
    assert peak == 3
    assert "] 10/10 failed 2" in stream.getvalue() and stream.getvalue().endswith("\n")


def test_the_bar_is_drawn_only_where_asked_or_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert Progress.shown(1, Terminal(), "auto").enabled and not Progress.shown(1, Terminal(), "never").enabled
    assert not Progress.shown(1, io.StringIO(), "auto").enabled and Progress.shown(1, io.StringIO(), "always").enabled


def test_the_summary_lists_every_failure_in_order():
    stream = io.StringIO()
    write_summary(stream, 5, "requests", [Failure("b.png", "boom"), Failure("a.png", "bang")], 1.234)
    assert stream.getvalue() == "5 requests in 1.2 s: 3 ok, 2 failed\n  a.png: bang\n  b.png: boom\n"
