import multiprocessing
import os

import pytest
import torch

from app.demo.made_ahead import made_ahead


def _item(step: int) -> tuple[int, int, torch.Tensor]:
    return step, os.getpid(), torch.full((2, 3), float(step))


@pytest.mark.parametrize("workers", [1, 2])
def test_items_come_in_step_order_made_by_other_processes_and_the_workers_end_with_them(workers):
    items = list(made_ahead(_item, 7, workers))
    assert [step for step, _, _ in items] == list(range(7))
    assert all(torch.equal(tensor, torch.full((2, 3), float(step))) for step, _, tensor in items)
    assert os.getpid() not in {pid for _, pid, _ in items}
    assert not multiprocessing.active_children()


def test_without_workers_the_caller_makes_each_item_when_asked_for_it():
    made = []
    items = made_ahead(lambda step: made.append(step) or step, 3, 0)
    assert made == []
    assert next(items) == 0 and made == [0]
    assert list(items) == [1, 2]


def _fails_at_two(step: int) -> int:
    if step == 2:
        raise ValueError("no scene 2")
    return step


def test_a_failing_item_raises_in_the_caller_and_leaves_no_worker_behind():
    seen = []
    with pytest.raises(ValueError, match="no scene 2"):
        for step in made_ahead(_fails_at_two, 5, 1):
            seen.append(step)
    assert seen == [0, 1]
    assert not multiprocessing.active_children()


def test_a_negative_worker_count_is_refused():
    with pytest.raises(ValueError, match="workers"):
        made_ahead(_item, 3, -1)
