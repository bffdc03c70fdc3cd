"""The engine (event-loop side + worker thread + scheduler) against a fake model side.

Everything here is about the engine's promises, not the model: every request gets exactly one answer,
rows are shared step by step, cancellation and deadlines free rows at once, faults stay with the request
that caused them, and shutdown answers everyone. Promises about when (at which step) are checked by
stepping the engine by hand (`StepByHand`, `step`), never by the clock.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.engine.front import EngineConfig, EngineFront, EngineRequest
from app.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull, ShuttingDown
from tests.unit.engine_fakes import DeviceBroken, FakeOOM, FakeRunner, Script, StepByHand

STOP = 1


class Recorder:
    """An EngineObserver that keeps what it hears."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.events.append((name, *args))

    def called(self, name: str) -> list[tuple]:
        return [event[1:] for event in self.events if event[0] == name]


def make(rows=4, queue=100, budget=10_000, runner=None, fatal=None):
    runner = runner or FakeRunner()
    recorder = Recorder()
    engine = EngineFront(runner, rows, frozenset({STOP}), EngineConfig(queue, budget), recorder,
                         is_oom=lambda exc: isinstance(exc, FakeOOM),
                         is_fatal=lambda exc: isinstance(exc, DeviceBroken),
                         on_fatal=fatal or (lambda exc: None))
    return engine, runner, recorder


def request(*tokens: int, max_new: int | None = None, **script) -> EngineRequest:
    return EngineRequest(prompt_length=10, max_new_tokens=max_new or len(tokens), payload=Script(tokens, **script),
                         label="/v1/test")


async def run(engine: EngineFront, req: EngineRequest, timeout_s: float = 5.0, on_tokens=None):
    return await engine.submit(engine.reserve(), req, timeout_s, on_tokens)


async def settle() -> None:
    """Let the event loop run what a step posted, and the requests it woke (or that were just made)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def step(engine: EngineFront, times: int = 1) -> None:
    """Run `times` model steps by hand (the engine was started on `StepByHand`), settling after each."""
    for _ in range(times):
        engine.core.step_once()
        await settle()


async def run_together(engine: EngineFront, *requests: EngineRequest) -> list:
    """Submit `requests` at once, then step by hand until each has its answer: a result or an error."""
    tasks = [asyncio.create_task(run(engine, req)) for req in requests]
    await settle()  # all of them wait for the first step
    while not all(task.done() for task in tasks):
        await step(engine)
    return [task.exception() or task.result() for task in tasks]


def test_each_request_gets_its_own_tokens_and_stops_at_its_own_end():
    async def main():
        engine, runner, recorder = make(rows=2)
        engine.start(StepByHand())
        results = await run_together(
            engine,
            request(5, 6, 7),                 # ends at its max_new_tokens
            request(8, STOP, 9),              # ends at a stop token
            request(3, 3, 3, 3, 3, 3),        # waits for a row, then runs
        )
        await engine.stop(1)
        return results, runner, recorder

    results, runner, recorder = asyncio.run(main())
    assert [r.tokens for r in results] == [[5, 6, 7], [8], [3] * 6]
    assert [(r.finish_reason, r.computed) for r in results] == [("length", 3), ("stop", 2), ("length", 6)]
    assert sum(count for _, _, count in recorder.called("tokens")) == 3 + 2 + 6
    # The third request started once a row was free, without waiting for both to end.
    third = max(max(ids) for ids in runner.prefills)
    first_prefill_with_third = next(i for i, ids in enumerate(runner.prefills) if third in ids)
    assert first_prefill_with_third == 1


def test_a_short_request_joins_a_long_one_and_finishes_long_before_it():
    async def main():
        engine, runner, _ = make(rows=4)
        engine.start(StepByHand())
        long = asyncio.create_task(run(engine, request(*([4] * 60))))
        await settle()
        await step(engine, 5)  # the long one is generating: its prefill, then 4 decodes
        short = asyncio.create_task(run(engine, request(2, 2, 2)))
        await settle()
        await step(engine, 3)  # the short one's prefill at the next step, then 2 decodes beside the long one
        short_done_at_8, long_done_at_8 = short.done(), long.done()
        steps = 8
        while not long.done():
            await step(engine)
            steps += 1
        await engine.stop(1)
        return short_done_at_8, long_done_at_8, steps, short.result(), long.result(), runner

    short_done, long_done, steps, short, long, runner = asyncio.run(main())
    assert short_done and not long_done
    assert (short.tokens, long.tokens) == ([2, 2, 2], [4] * 60)
    assert steps == 60  # one token per step for the long one: the short one cost it no step
    assert [len(ids) for ids, _ in runner.decodes].count(2) == 2  # the two decode steps they shared


def test_a_client_that_leaves_mid_generation_frees_its_row_within_a_step():
    async def main():
        engine, runner, recorder = make(rows=1)
        engine.start(StepByHand())
        leaver = asyncio.create_task(run(engine, request(*([4] * 500))))
        await settle()
        await step(engine, 10)
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        # The only row is free at the next step: the next request runs at once, not after 490 more steps.
        following = asyncio.create_task(run(engine, request(7, 7)))
        await settle()
        await step(engine, 2)
        done = following.done()
        await engine.stop(1)
        return done, following.result(), runner, recorder

    done, result, runner, recorder = asyncio.run(main())
    assert done and result.tokens == [7, 7]
    leaver_tokens = sum(count for _, _, count in recorder.called("tokens")) - 2
    assert leaver_tokens == 10  # one per step while it held the row, none after it left
    assert ("disconnected",) in recorder.called("dropped")
    assert runner.prefills[0][0] in runner.released  # its per-row state was released


def test_a_deadline_that_passes_mid_generation_answers_504_and_frees_the_row():
    async def main():
        engine, runner, recorder = make(rows=1)
        engine.start(StepByHand())
        running = asyncio.create_task(run(engine, request(*([4] * 500)), timeout_s=0.05))
        await settle()
        await step(engine, 3)  # it holds the only row
        waiting = asyncio.create_task(run(engine, request(9, 9), timeout_s=0.05))  # no row for this one
        await settle()
        await asyncio.sleep(0.1)  # both deadlines pass; no step runs meanwhile
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        after = asyncio.create_task(run(engine, request(6)))
        await settle()
        await step(engine)  # drops both and runs the newcomer in the freed row
        done = after.done()
        await engine.stop(1)
        return outcomes, done, after.result(), runner, recorder

    (running, waiting), done, result, runner, recorder = asyncio.run(main())
    assert isinstance(running, DeadlineExceeded) and "did not finish within" in running.message
    assert isinstance(waiting, DeadlineExceeded) and "waited more than" in waiting.message
    assert done and result.tokens == [6]
    assert recorder.called("dropped") == [("timeout",), ("timeout",)]
    prefilled = [rid for ids in runner.prefills for rid in ids]
    assert len(prefilled) == 2  # the one that timed out while waiting was never prefilled


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
        engine.start(StepByHand())
        results = await run_together(engine, request(5, 5), request(6, 6, fail_prefill=True), request(7, 7))
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
        engine.start(StepByHand())
        results = await run_together(engine, request(5, 5, 5, 5), request(6, 6, 6, 6, fail_decode_at=2),
                                     request(7, 7, 7, 7))
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
        engine.start(StepByHand())
        results = await run_together(engine, *(request(i, i, oom_prefill_with_more_than=2) for i in range(2, 8)))
        await engine.stop(1)
        return results, runner, engine

    results, runner, engine = asyncio.run(main())
    assert [r.tokens for r in results] == [[i, i] for i in range(2, 8)]  # nobody failed
    # Six prompts of 10 tokens: out of memory, then half the tokens (30: three), out of memory again,
    # then 15 (one at a time) from then on.
    assert [len(ids) for ids in runner.prefills] == [6, 3, 1, 1, 1, 1, 1, 1]
    assert runner.recovered == 2
    assert engine.scheduler.prefill_token_budget == 15


def test_an_unrecoverable_device_error_fails_everyone_and_reports_it():
    reported = []

    async def main():
        engine, _, _ = make(rows=4, fatal=reported.append)
        engine.start(StepByHand())
        results = await run_together(engine, request(5, 5, 5, fatal_at=1), request(6, 6, 6))
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
        engine.start(StepByHand())
        pending = [asyncio.create_task(run(engine, request(*([i] * 200)))) for i in range(2, 5)]
        await settle()
        await step(engine, 2)  # one generating, two waiting for the row
        await engine.stop(0.05)  # no step runs: the drain's deadline passes with all three unfinished
        results = await asyncio.gather(*pending, return_exceptions=True)
        engine.core.step_once()  # the worker takes the abort, then the stop
        return results, engine.scheduler.idle

    results, idle = asyncio.run(main())
    assert all(isinstance(r, ShuttingDown) for r in results)
    assert idle


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
        post = engine.core.post
        engine.core.post = lambda events: (posted.append(events), post(events))
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
        engine, runner, _ = make(rows=1)
        engine.start()  # the worker thread: the event loop watches a step while it runs
        idle = engine.stalled_for()
        gate = threading.Event()
        task = asyncio.create_task(run(engine, request(3, gate=gate)))
        assert await asyncio.to_thread(runner.stepping.wait, 10)
        inside = engine.stalled_for()
        await asyncio.sleep(0.01)
        later = engine.stalled_for()
        gate.set()
        await task
        for _ in range(1000):  # the step has ended; the worker marks it so just after posting its result
            if engine.stalled_for() == 0.0:
                break
            await asyncio.sleep(0.01)
        after = engine.stalled_for()
        await engine.stop(1)
        return idle, inside, later, after

    idle, inside, later, after = asyncio.run(main())
    assert idle == 0.0
    assert 0.0 < inside < later  # it grows while the step runs
    assert after == 0.0
