"""The batching queue against fake runners: sizes, waits, capacity, deadlines, faults, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.engine.batcher import Batcher, BatcherConfig, BatchObserver
from app.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull, ShuttingDown


class Recorder(BatchObserver):
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.drops: list[str] = []
        self.rejections: list[str] = []

    def batch_started(self, size, queue_waits):
        self.batches.append(size)

    def dropped(self, reason):
        self.drops.append(reason)

    def rejected(self, reason):
        self.rejections.append(reason)


def doubler(delay: float = 0.0, fail_on: frozenset[int] = frozenset()):
    calls: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        time.sleep(delay)
        if fail_on & set(batch):
            raise ValueError("bad input in batch")
        return [x * 2 for x in batch]

    return run, calls


def make(run, max_batch=4, wait_s=0.05, queue=100, **kw):
    recorder = Recorder()
    return Batcher(run, BatcherConfig(max_batch, wait_s, queue), observer=recorder, **kw), recorder


def gated_runner():
    """A runner that records what it computes and holds the worker until the gate opens."""
    gate = threading.Event()
    seen: list[int] = []

    def run(batch):
        seen.extend(batch)
        gate.wait(5)
        return batch

    return gate, seen, run


async def submit(batcher, value, timeout_s=5.0):
    return await batcher.submit(batcher.reserve(), value, timeout_s)


def test_results_come_back_to_their_own_callers_in_full_batches():
    async def main():
        run, calls = doubler(delay=0.01)
        batcher, rec = make(run, max_batch=4, wait_s=0.5)
        batcher.start()
        results = await asyncio.gather(*(submit(batcher, i) for i in range(8)))
        await batcher.stop(1)
        return results, calls, rec

    results, calls, rec = asyncio.run(main())
    assert results == [i * 2 for i in range(8)]
    assert rec.batches == [4, 4]  # full batches leave without waiting the 0.5 s
    assert sorted(x for c in calls for x in c) == list(range(8))


def test_a_lone_request_waits_for_company_at_most_max_wait():
    async def main():
        run, calls = doubler()
        batcher, _ = make(run, max_batch=8, wait_s=0.3)
        batcher.start()
        started = time.monotonic()
        first = asyncio.create_task(submit(batcher, 1))
        await asyncio.sleep(0.1)
        second = await submit(batcher, 2)  # arrives within the first one's wait: same batch
        results = [await first, second]
        waited = time.monotonic() - started
        await batcher.stop(1)
        return results, calls, waited

    results, calls, waited = asyncio.run(main())
    assert results == [2, 4]
    assert calls == [[1, 2]]
    assert 0.25 < waited < 3


def test_requests_queued_behind_a_busy_worker_are_batched_at_once():
    async def main():
        run, _ = doubler(delay=0.3)
        batcher, rec = make(run, max_batch=3, wait_s=10.0)  # a long wait that must not be paid
        batcher.start()
        first = [asyncio.create_task(submit(batcher, i)) for i in range(3)]  # a full batch leaves at once
        await asyncio.sleep(0.1)
        started = time.monotonic()
        rest = await asyncio.gather(*(submit(batcher, i) for i in range(3, 5)))
        elapsed = time.monotonic() - started
        await asyncio.gather(*first)
        await batcher.stop(1)
        return rest, rec, elapsed

    rest, rec, elapsed = asyncio.run(main())
    assert rest == [6, 8]
    assert rec.batches == [3, 2]
    assert elapsed < 5, "waited for max_wait although the requests had already waited for the worker"


def test_queue_capacity_is_enforced_at_admission():
    async def main():
        run, _ = doubler()
        batcher, rec = make(run, queue=2)
        a, b = batcher.reserve(), batcher.reserve()
        with pytest.raises(QueueFull) as err:
            batcher.reserve()
        assert err.value.headers["Retry-After"] == "1"
        a.release()
        a.release()  # idempotent
        c = batcher.reserve()
        b.release()
        c.release()
        assert batcher.depth == 0
        return rec

    assert asyncio.run(main()).rejections == ["queue_full"]


def test_a_request_past_its_deadline_is_answered_504_and_not_computed():
    async def main():
        gate, seen, run = gated_runner()
        batcher, rec = make(run, max_batch=1, wait_s=0)
        batcher.start()
        blocker = asyncio.create_task(submit(batcher, 1))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await submit(batcher, 2, timeout_s=0.1)
        gate.set()
        await blocker
        await asyncio.sleep(0.05)
        await batcher.stop(1)
        return seen, rec

    seen, rec = asyncio.run(main())
    assert seen == [1]
    assert rec.drops == ["timeout"]


def test_a_cancelled_caller_is_skipped_and_does_not_break_the_loop():
    async def main():
        gate, seen, run = gated_runner()
        batcher, rec = make(run, max_batch=1, wait_s=0)
        batcher.start()
        blocker = asyncio.create_task(submit(batcher, 1))
        await asyncio.sleep(0.05)
        leaver = asyncio.create_task(submit(batcher, 2))
        await asyncio.sleep(0.05)
        leaver.cancel()
        gate.set()
        assert await blocker == 1
        assert await submit(batcher, 3) == 3
        await batcher.stop(1)
        return seen, rec, batcher.depth

    seen, rec, depth = asyncio.run(main())
    assert seen == [1, 3]
    assert rec.drops == ["disconnected"]
    assert depth == 0


def test_a_failing_request_does_not_fail_its_neighbours():
    async def main():
        run, calls = doubler(fail_on=frozenset({3}))
        batcher, _ = make(run, max_batch=4, wait_s=0.5)
        batcher.start()
        results = await asyncio.gather(*(submit(batcher, i) for i in range(4)), return_exceptions=True)
        await batcher.stop(1)
        return results, calls

    results, calls = asyncio.run(main())
    assert results[:3] == [0, 2, 4]
    assert isinstance(results[3], InferenceFailed)
    assert calls[0] == [0, 1, 2, 3] and [3] in calls


def test_out_of_memory_splits_the_batch_and_lowers_the_batch_size():
    class FakeOOM(Exception):
        pass

    def run(batch):
        if len(batch) > 2:
            raise FakeOOM
        return batch

    async def main():
        batcher, _ = make(run, max_batch=8, wait_s=0.5, is_oom=lambda e: isinstance(e, FakeOOM))
        batcher.start()
        results = await asyncio.gather(*(submit(batcher, i) for i in range(8)))
        size = batcher.batch_size_in_effect
        await batcher.stop(1)
        return results, size

    results, size = asyncio.run(main())
    assert results == list(range(8))
    assert size == 2


def test_stop_drains_admitted_requests_then_refuses_new_ones():
    async def main():
        run, _ = doubler(delay=0.05)
        batcher, _ = make(run, max_batch=2, wait_s=0)
        batcher.start()
        pending = [asyncio.create_task(submit(batcher, i)) for i in range(6)]
        await asyncio.sleep(0.01)
        await batcher.stop(5)
        with pytest.raises(ShuttingDown):
            batcher.reserve()
        return await asyncio.gather(*pending)

    assert asyncio.run(main()) == [i * 2 for i in range(6)]


def test_wrong_number_of_outputs_is_an_error_not_a_mixup():
    async def main():
        batcher, _ = make(lambda batch: batch[:-1], max_batch=2, wait_s=0.2)
        batcher.start()
        results = await asyncio.gather(submit(batcher, 1), submit(batcher, 2), return_exceptions=True)
        await batcher.stop(1)
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, InferenceFailed) for r in results)


def test_an_unrecoverable_error_fails_everything_and_reports_it_once():
    class DeviceBroken(Exception):
        pass

    reported: list[BaseException] = []

    def run(batch):
        raise DeviceBroken("CUDA error: an illegal memory access was encountered")

    async def main():
        batcher, _ = make(run, max_batch=2, wait_s=0.2, is_fatal=lambda e: isinstance(e, DeviceBroken),
                          on_fatal=reported.append)
        batcher.start()
        results = await asyncio.gather(*(submit(batcher, i) for i in range(3)), return_exceptions=True)
        with pytest.raises(NotReady):
            batcher.reserve()
        await batcher.stop(1)
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, NotReady) for r in results)
    assert len(reported) == 1 and isinstance(reported[0], DeviceBroken)


def test_when_more_wait_than_fit_requests_with_similar_budgets_ride_together():
    async def main():
        gate, _, run = gated_runner()
        calls: list[list[int]] = []

        def recording(batch):
            calls.append(list(batch))
            return run(batch)

        batcher, _ = make(recording, max_batch=3, wait_s=0, group_key=lambda value: value % 100)
        batcher.start()
        blocker = asyncio.create_task(submit(batcher, 0))
        await asyncio.sleep(0.05)
        # Budgets (value % 100): 16, 64, 16, 64, 16, 64, 64 — queued in this order behind the blocker.
        values = [116, 264, 316, 464, 516, 664, 764]
        tasks = []
        for value in values:
            tasks.append(asyncio.create_task(submit(batcher, value)))
            await asyncio.sleep(0.005)
        gate.set()
        results = await asyncio.gather(*tasks)
        await blocker
        await batcher.stop(1)
        return calls, results

    calls, results = asyncio.run(main())
    assert results == [116, 264, 316, 464, 516, 664, 764]
    assert calls[0] == [0]
    # The oldest (116) leaves first with the other 16-token requests; then the 64s, oldest first.
    assert calls[1] == [116, 316, 516]
    assert calls[2] == [264, 464, 664]
    assert calls[3] == [764]
