"""The scheduler alone: rows, admission, retirement, cancellation. Pure Python, no model."""

from __future__ import annotations

import pytest

from app.engine.scheduler import Scheduler, Sequence, State

STOP = frozenset({1})


def seq(prompt: int = 10, max_new: int = 4) -> Sequence:
    return Sequence(prompt_length=prompt, max_new_tokens=max_new, stop_tokens=STOP)


def test_newcomers_take_the_lowest_free_rows_and_wait_when_rows_are_full():
    s = Scheduler(rows=3, prefill_token_budget=10_000)
    seqs = [seq() for _ in range(5)]
    for x in seqs:
        s.add(x)
    plan = s.plan()
    assert [x.row for x in plan.admitted] == [0, 1, 2]
    assert plan.decode == []
    assert [x.state for x in seqs] == [State.RUNNING] * 3 + [State.WAITING] * 2
    assert s.decode_width == 3
    # Row 1 finishes: the next waiting request gets row 1 at the next step, not a new row.
    s.update([seqs[1]], [1])
    plan = s.plan()
    assert plan.admitted == [seqs[3]] and seqs[3].row == 1
    assert plan.decode == [seqs[0], seqs[2]]  # the newcomer is prefilled, not decoded, this step


def test_a_row_retires_the_step_its_own_output_ends():
    s = Scheduler(rows=2, prefill_token_budget=10_000)
    short, long = seq(max_new=2), seq(max_new=5)
    s.add(short)
    s.add(long)
    s.plan()
    assert s.update([short, long], [7, 7]) == []
    assert s.update([short, long], [8, 9]) == [short]  # its own max_new_tokens
    assert short.finish_reason == "length" and short.output_tokens == [7, 8] and short.row is None
    assert s.plan().decode == [long]
    assert s.update([long], [1]) == [long]  # a stop token: computed, but not part of the output
    assert long.finish_reason == "stop" and long.output_tokens == [7, 9] and long.computed == [7, 9, 1]
    assert s.idle


def test_positions_follow_each_rows_own_length():
    s = Scheduler(rows=2, prefill_token_budget=10_000)
    a, b = seq(prompt=5, max_new=9), seq(prompt=8, max_new=9)
    s.add(a)
    s.add(b)
    s.plan()
    s.update([a], [3])
    s.update([b], [3])
    assert (a.next_position, b.next_position) == (5, 8)  # the first generated token goes right after
    s.update([a], [4])
    assert (a.next_position, b.next_position) == (6, 8)


def test_cancelled_requests_leave_at_the_next_plan_from_the_queue_or_their_row():
    s = Scheduler(rows=1, prefill_token_budget=10_000)
    running, waiting = seq(), seq()
    s.add(running)
    s.add(waiting)
    s.plan()
    running.cancel_reason = "disconnected"
    plan = s.plan()
    assert plan.dropped == [running] and running.state is State.DROPPED
    assert plan.admitted == [waiting] and waiting.row == 0  # the freed row is reused at once
    extra = seq()
    s.add(extra)
    extra.cancel_reason = "timeout"
    assert s.plan().dropped == [extra]


def test_the_prefill_budget_bounds_a_step_but_always_admits_one():
    s = Scheduler(rows=8, prefill_token_budget=25)
    seqs = [seq(prompt=10) for _ in range(3)] + [seq(prompt=100)]
    for x in seqs:
        s.add(x)
    assert s.plan().admitted == seqs[:2]  # 10 + 10 <= 25, a third would not fit
    assert s.plan().admitted == [seqs[2]]
    assert s.plan().admitted == [seqs[3]]  # longer than the whole budget, alone: still admitted


def test_requeue_gives_rows_back_and_puts_the_requests_first_in_line():
    s = Scheduler(rows=2, prefill_token_budget=10_000)
    a, b, c = seq(), seq(), seq()
    for x in (a, b, c):
        s.add(x)
    plan = s.plan()
    s.requeue(plan.admitted)
    assert list(s.waiting) == [a, b, c] and not s.running
    assert s.plan().admitted == [a, b]


def test_shrink_caps_running_rows_without_touching_those_running():
    s = Scheduler(rows=4, prefill_token_budget=10_000)
    seqs = [seq() for _ in range(6)]
    for x in seqs:
        s.add(x)
    s.plan()
    s.shrink(2)
    s.update([seqs[0]], [1])
    assert s.plan().admitted == []  # 3 still running > 2
    s.update([seqs[1]], [1])
    s.update([seqs[2]], [1])
    assert len(s.plan().admitted) == 1  # back to 2 running


def test_updating_a_request_that_is_not_running_is_a_bug():
    s = Scheduler(rows=1, prefill_token_budget=10_000)
    x = seq()
    s.add(x)
    with pytest.raises(RuntimeError):
        s.update([x], [3])
