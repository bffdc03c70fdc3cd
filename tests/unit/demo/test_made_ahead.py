import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.demo.made_ahead import made_ahead

_ROOT = Path(__file__).resolve().parents[3]


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


_TRAINER = """
import os, sys, time
from app.demo.made_ahead import made_ahead

def item(step):
    print(os.getpid(), flush=True)  # from the worker
    return bytes(1 << 20)  # items as big as a step's scenes fill the pipe the worker hands them over in

for step in made_ahead(item, 10_000, 1):
    time.sleep(60)  # the trainer's long step; the worker waits with its items made ahead
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_trainer_takes_its_workers_with_it(kill):
    worker = 0
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER], cwd=_ROOT, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(_ROOT)})
    try:
        assert trainer.stdout is not None
        worker = int(trainer.stdout.readline())
        assert worker != trainer.pid and _alive(worker)
        trainer.send_signal(kill)
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker)
    finally:
        trainer.kill()
        trainer.wait()
        if worker and _alive(worker):  # left behind: end it here, not with the test run
            os.kill(worker, signal.SIGKILL)
