"""Device work handed to the engine's core from other threads: run once per step for everyone who asked,
faults kept with their items, nothing left unanswered when the core stops."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.engine.front import EngineConfig, EngineFront
from app.engine.step_work import StepWork
from app.errors import ShuttingDown
from tests.unit.engine_fakes import DeviceBroken, FakeRunner


class Doubler:
    """Doubles numbers, one call per batch; fails on the numbers it is told to."""

    def __init__(self, bad: set[int] = frozenset(), fatal: set[int] = frozenset()):
        self.calls: list[list[int]] = []
        self.threads: set[int] = set()
        self.bad, self.fatal = bad, fatal

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.threads.add(threading.get_ident())
        if self.fatal & set(items):
            raise DeviceBroken("CUDA error: an illegal memory access was encountered")
        if self.bad & set(items):
            raise ValueError("bad item")
        return [2 * item for item in items]


def never_fatal(exc: BaseException) -> bool:
    return False


def test_items_submitted_between_runs_go_in_one_call():
    fn = Doubler()
    work = StepWork("double", fn)
    futures = [work.submit(i) for i in range(5)]
    work.run(never_fatal)
    assert fn.calls == [[0, 1, 2, 3, 4]] and [f.result() for f in futures] == [0, 2, 4, 6, 8]
    work.run(never_fatal)  # nothing pending: no call
    assert len(fn.calls) == 1


def test_a_failing_item_fails_alone():
    fn = Doubler(bad={3})
    work = StepWork("double", fn)
    futures = [work.submit(i) for i in (1, 3, 5)]
    work.run(never_fatal)
    assert futures[0].result() == 2 and futures[2].result() == 10
    with pytest.raises(ValueError):
        futures[1].result()
    assert fn.calls == [[1, 3, 5], [1], [3], [5]]


def test_a_fatal_error_fails_the_batch_and_reaches_the_caller():
    work = StepWork("double", Doubler(fatal={2}))
    futures = [work.submit(i) for i in (1, 2)]
    with pytest.raises(DeviceBroken):
        work.run(lambda exc: isinstance(exc, DeviceBroken))
    assert all(isinstance(f.exception(), DeviceBroken) for f in futures)


def test_the_engine_runs_work_in_its_model_thread_even_with_no_request_running():
    async def main():
        fn = Doubler()
        work = StepWork("double", fn)
        engine = EngineFront(FakeRunner(), 2, frozenset({1}), EngineConfig(10, 1000), work=[work])
        engine.start()
        results = await asyncio.gather(*(asyncio.wrap_future(work.submit(i)) for i in range(3)))
        await engine.stop(1)
        return results, fn

    results, fn = asyncio.run(main())
    assert results == [0, 2, 4]
    assert threading.get_ident() not in fn.threads and len(fn.threads) == 1
    assert sum(map(len, fn.calls)) == 3


def test_work_left_when_the_engine_stops_is_answered():
    async def main():
        gate = threading.Event()
        work = StepWork("double", lambda items: (gate.wait(5), [2 * i for i in items])[1])
        engine = EngineFront(FakeRunner(), 2, frozenset({1}), EngineConfig(10, 1000), work=[work])
        engine.start()
        first = work.submit(1)
        await asyncio.sleep(0.1)  # the core is inside the first batch now
        engine.core.stop(0)  # the stop waits in the inbox before the second item's wake-up
        second = work.submit(2)
        gate.set()
        await asyncio.to_thread(engine.core.stop, 2.0)
        return first, second

    first, second = asyncio.run(main())
    assert first.result() == 2
    assert isinstance(second.exception(), ShuttingDown)
