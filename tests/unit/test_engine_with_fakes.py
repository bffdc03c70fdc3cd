"""The engine (event-loop side + worker thread + scheduler) against a fake model side.

Everything here is about the engine's promises, not the model: every request gets exactly one answer,
rows are shared step by step, cancellation and deadlines free rows at once, faults stay with the request
that caused them, and shutdown answers everyone.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from app.engine.engine import Engine, EngineConfig, EngineRequest
from app.engine.scheduler import Sequence
from app.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull, ShuttingDown
from tests.unit.engine_fakes import DeviceBroken, FakeOOM, FakeRunner, Script

STOP = 1


class Recorder:
    """An EngineObserver that keeps what it hears."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.events.append((name, *args))

    def called(self, name: str) -> list[tuple]:
        return [event[1:] for event in self.events if event[0] == name]


def finish(seqs: list[Sequence]) -> list[list[int]]:
    return [list(seq.output_tokens) for seq in seqs]


def make(rows=4, queue=100, budget=10_000, runner=None, fatal=None):
    runner = runner or FakeRunner()
    recorder = Recorder()
    engine = Engine(runner, finish, rows, frozenset({STOP}), EngineConfig(queue, budget), recorder,
                    is_oom=lambda exc: isinstance(exc, FakeOOM),
                    is_fatal=lambda exc: isinstance(exc, DeviceBroken),
                    on_fatal=fatal or (lambda exc: None))
    return engine, runner, recorder


def request(*tokens: int, max_new: int | None = None, **script) -> EngineRequest:
    return EngineRequest(prompt_length=10, max_new_tokens=max_new or len(tokens), payload=Script(tokens, **script),
                         label="/v1/test")


async def run(engine: Engine, req: EngineRequest, timeout_s: float = 5.0, on_tokens=None):
    return await engine.submit(engine.reserve(), req, timeout_s, on_tokens)


def test_each_request_gets_its_own_tokens_and_stops_at_its_own_end():
    async def main():
        engine, runner, recorder = make(rows=2)
        engine.start()
        results = await asyncio.gather(
            run(engine, request(5, 6, 7)),                 # ends at its max_new_tokens
            run(engine, request(8, STOP, 9)),              # ends at a stop token
            run(engine, request(3, 3, 3, 3, 3, 3)),        # waits for a row, then runs
        )
        await engine.stop(1)
        return results, runner, recorder

    results, runner, recorder = asyncio.run(main())
    assert [r.tokens for r in results] == [[5, 6, 7], [8], [3] * 6]
    assert [r.output for r in results] == [[5, 6, 7], [8], [3] * 6]
    assert [(r.finish_reason, r.computed) for r in results] == [("length", 3), ("stop", 2), ("length", 6)]
    assert sum(count for _, _, count in recorder.called("tokens")) == 3 + 2 + 6
    # The third request started once a row was free, without waiting for both to end.
    third = max(max(ids) for ids in runner.prefills)
    first_prefill_with_third = next(i for i, ids in enumerate(runner.prefills) if third in ids)
    assert first_prefill_with_third == 1


def test_a_short_request_joins_a_long_one_and_finishes_long_before_it():
    async def main():
        engine, runner, _ = make(rows=4)
        engine.start()
        finished = {}

        async def timed(name, req):
            await run(engine, req)
            finished[name] = time.monotonic()

        long = asyncio.create_task(timed("long", request(*([4] * 60), step_seconds=0.01)))
        await asyncio.sleep(0.1)  # the long one is generating by now
        await timed("short", request(2, 2, 2))
        short_done = time.monotonic()
        await long
        await engine.stop(1)
        return finished, short_done, runner

    finished, _, runner = asyncio.run(main())
    assert finished["short"] < finished["long"] - 0.2
    # They shared decode steps: some step decoded both rows.
    assert any(len(ids) == 2 for ids, _ in runner.decodes)


def test_a_client_that_leaves_mid_generation_frees_its_row_within_a_step():
    async def main():
        engine, runner, recorder = make(rows=1)
        engine.start()
        leaver = asyncio.create_task(run(engine, request(*([4] * 500), step_seconds=0.005)))
        await asyncio.sleep(0.15)
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        # The only row is free again: the next request runs at once rather than after 500 steps.
        started = time.monotonic()
        result = await run(engine, request(7, 7))
        elapsed = time.monotonic() - started
        await engine.stop(1)
        return result, elapsed, runner, recorder

    result, elapsed, runner, recorder = asyncio.run(main())
    assert result.tokens == [7, 7]
    assert elapsed < 1.0
    leaver_tokens = sum(count for _, _, count in recorder.called("tokens")) - 2
    assert 5 < leaver_tokens < 200, leaver_tokens  # it generated for a while, then stopped
    assert ("disconnected",) in recorder.called("dropped")
    assert runner.prefills[0][0] in runner.released  # its per-row state was released


def test_a_deadline_that_passes_mid_generation_answers_504_and_frees_the_row():
    async def main():
        engine, runner, recorder = make(rows=1)
        engine.start()
        with pytest.raises(DeadlineExceeded, match="did not finish within"):
            await run(engine, request(*([4] * 500), step_seconds=0.005), timeout_s=0.2)
        result = await run(engine, request(6))
        # One still waiting for a row when its time is up never runs at all.
        blocker = asyncio.create_task(run(engine, request(*([4] * 100), step_seconds=0.005)))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded, match="waited more than"):
            await run(engine, request(9, 9), timeout_s=0.1)
        await blocker
        await engine.stop(1)
        return result, runner, recorder

    result, runner, recorder = asyncio.run(main())
    assert result.tokens == [6]
    assert recorder.called("dropped") == [("timeout",), ("timeout",)]
    prefilled = [rid for ids in runner.prefills for rid in ids]
    assert len(prefilled) == 3  # the one that timed out while waiting was never prefilled


def test_admission_is_bounded_and_refusals_are_counted():
    async def main():
        engine, _, recorder = make(queue=2)
        a, b = engine.reserve(), engine.reserve()
        with pytest.raises(QueueFull) as refused:
            engine.reserve()
        a.release()
        c = engine.reserve()
        b.release()
        c.release()
        return refused.value, engine.depth, recorder

    refused, depth, recorder = asyncio.run(main())
    assert refused.headers["Retry-After"] == "1"
    assert depth == 0
    assert recorder.called("rejected") == [("queue_full",)]


def test_a_request_that_fails_its_prefill_fails_alone():
    async def main():
        engine, runner, _ = make(rows=4)
        engine.start()
        results = await asyncio.gather(run(engine, request(5, 5)), run(engine, request(6, 6, fail_prefill=True)),
                                       run(engine, request(7, 7)), return_exceptions=True)
        await engine.stop(1)
        return results, runner

    results, runner = asyncio.run(main())
    assert results[0].tokens == [5, 5] and results[2].tokens == [7, 7]
    assert isinstance(results[1], InferenceFailed)
    assert len(runner.prefills[0]) == 3
    assert [len(ids) for ids in runner.prefills[1:]] == [1, 1, 1]  # retried one at a time


def test_a_failing_decode_step_fails_only_the_row_that_fails_alone():
    async def main():
        engine, runner, _ = make(rows=4)
        engine.start()
        results = await asyncio.gather(run(engine, request(5, 5, 5, 5)),
                                       run(engine, request(6, 6, 6, 6, fail_decode_at=2)),
                                       run(engine, request(7, 7, 7, 7)), return_exceptions=True)
        await engine.stop(1)
        return results, runner

    results, runner = asyncio.run(main())
    assert results[0].tokens == [5, 5, 5, 5] and results[2].tokens == [7, 7, 7, 7]
    assert isinstance(results[1], InferenceFailed)
    # The failing step was rerun row by row; the two healthy rows then went on together.
    assert sorted(runner.alone) == sorted(runner.prefills[0])
    assert len(runner.decodes[-1][0]) == 2


def test_out_of_memory_on_a_prefill_requeues_and_prefills_fewer_at_a_time():
    async def main():
        engine, runner, _ = make(rows=8)
        engine.start()
        results = await asyncio.gather(*(run(engine, request(i, i, oom_prefill_with_more_than=2))
                                         for i in range(2, 8)))
        await engine.stop(1)
        return results, runner, engine

    results, runner, engine = asyncio.run(main())
    assert [r.tokens for r in results] == [[i, i] for i in range(2, 8)]  # nobody failed
    assert runner.recovered >= 1
    assert all(len(ids) <= 2 for ids in runner.prefills[-3:])
    assert engine.scheduler.prefill_token_budget <= 20


def test_an_unrecoverable_device_error_fails_everyone_and_reports_it():
    reported = []

    async def main():
        engine, _, _ = make(rows=4, fatal=reported.append)
        engine.start()
        results = await asyncio.gather(run(engine, request(5, 5, 5, fatal_at=1)), run(engine, request(6, 6, 6)),
                                       return_exceptions=True)
        with pytest.raises(NotReady):
            engine.reserve()
        await engine.stop(1)
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, NotReady) for r in results)
    assert len(reported) == 1 and isinstance(reported[0], DeviceBroken)


def test_stop_drains_admitted_requests_then_refuses_new_ones():
    async def main():
        engine, _, recorder = make(rows=1)
        engine.start()
        pending = [asyncio.create_task(run(engine, request(i, i, step_seconds=0.01))) for i in range(2, 6)]
        await asyncio.sleep(0.02)
        await engine.stop(5)
        with pytest.raises(ShuttingDown):
            engine.reserve()
        return [p.result().tokens for p in pending], recorder

    results, recorder = asyncio.run(main())
    assert results == [[i, i] for i in range(2, 6)]
    assert recorder.called("rejected") == [("shutting_down",)]


def test_a_drain_that_runs_out_of_time_answers_the_rest_503_and_stops():
    async def main():
        engine, _, _ = make(rows=1)
        engine.start()
        pending = [asyncio.create_task(run(engine, request(*([i] * 200), step_seconds=0.01)))
                   for i in range(2, 5)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await engine.stop(0.2)
        elapsed = time.monotonic() - started
        return await asyncio.gather(*pending, return_exceptions=True), elapsed

    results, elapsed = asyncio.run(main())
    assert all(isinstance(r, ShuttingDown) for r in results)
    assert elapsed < 1.5


def test_tokens_stream_to_the_callback_as_steps_compute_them():
    async def main():
        engine, _, _ = make(rows=2)
        engine.start()
        seen: list[int] = []
        result = await run(engine, request(4, 5, 6, STOP, max_new=8), on_tokens=seen.extend)
        await engine.stop(1)
        return seen, result

    seen, result = asyncio.run(main())
    assert seen == [4, 5, 6]  # the stop token is not part of the output
    assert result.tokens == seen


def test_a_request_cut_at_its_limit_streams_its_last_token_too():
    async def main():
        engine, _, _ = make(rows=2)
        engine.start()
        seen: list[int] = []
        result = await run(engine, request(4, 5, 6), on_tokens=seen.extend)
        await engine.stop(1)
        return seen, result

    seen, result = asyncio.run(main())
    assert seen == result.tokens == [4, 5, 6]


def test_only_streamed_requests_wake_the_event_loop_every_step():
    # Each wake-up is a thread switch the worker pays for on every step; a request nobody streams needs
    # the event loop only when it starts and when it finishes.
    async def main(stream: bool):
        engine, _, _ = make(rows=2)
        posted: list[object] = []
        post = engine.worker.post
        engine.worker.post = lambda events: (posted.append(events), post(events))
        engine.start()
        seen: list[int] = []
        result = await run(engine, request(*range(2, 10)), on_tokens=seen.extend if stream else None)
        await engine.stop(1)
        return len(posted), seen, result

    quiet_posts, _, quiet = asyncio.run(main(stream=False))
    streamed_posts, seen, streamed = asyncio.run(main(stream=True))
    assert quiet.tokens == streamed.tokens == seen == list(range(2, 10))
    assert quiet_posts <= 3  # started, first token (the prefill's step), finished
    assert streamed_posts >= 8


def test_the_worker_reports_how_long_it_has_been_inside_one_step():
    async def main():
        engine, _, _ = make(rows=1)
        engine.start()
        assert engine.stalled_for() == 0.0
        task = asyncio.create_task(run(engine, request(3, step_seconds=0.5)))
        await asyncio.sleep(0.3)
        inside = engine.stalled_for()
        await task
        after = engine.stalled_for()
        await engine.stop(1)
        return inside, after

    inside, after = asyncio.run(main())
    assert 0.15 < inside < 0.5
    assert after == 0.0
