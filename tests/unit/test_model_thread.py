"""ModelThread: the one thread that runs the model's work, in order, with results and errors returned."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.engine.model_thread import ModelThread


def test_calls_run_in_order_on_one_thread_and_return_their_results():
    thread = ModelThread()
    seen: list[tuple[int, int]] = []
    futures = [thread.submit(lambda i=i: seen.append((i, threading.get_ident())) or i * i) for i in range(20)]
    assert [f.result(timeout=5) for f in futures] == [i * i for i in range(20)]
    assert [i for i, _ in seen] == list(range(20))
    assert len({ident for _, ident in seen}) == 1 and seen[0][1] != threading.get_ident()
    thread.close()


def test_an_error_goes_back_to_the_caller_and_the_thread_carries_on():
    thread = ModelThread()

    def fail():
        raise ValueError("bad checkpoint")

    async def main():
        with pytest.raises(ValueError, match="bad checkpoint"):
            await thread.run(fail)
        return await thread.run(lambda: "still here")

    assert asyncio.run(main()) == "still here"
    thread.close()


def test_close_stops_the_thread_after_what_was_submitted():
    thread = ModelThread()
    last = thread.submit(lambda: "done")
    thread.close()
    thread._thread.join(5)
    assert last.result(timeout=0) == "done" and not thread._thread.is_alive()
