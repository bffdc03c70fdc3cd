"""What each row feeds the next decode step has one owner, the runner's row table; decode steps over
row-count buckets read it as it stands, idle rows included.

A CUDA graph cannot be captured on a CPU, so the runner's capture seam gets a stand-in: a "graph" that
runs the eager step over the whole bucket (every row, whole cache rows), which is what a captured graph
computes. Outputs through it must still equal `model.generate` for each request alone.
"""

from __future__ import annotations

import random

import pytest

from app.engine.core import EngineCore
from app.engine.graphs import Replay
from app.engine.observer import NullObserver
from app.engine.runner import ModelStepRunner, RunnerConfig
from app.engine.scheduler import Scheduler, Sequence, State
from app.model.loader import LoadedModel, load_model
from app.settings import Settings
from tests.model.test_engine_exactness import PROMPTS, generate_alone, make_input


class EagerStandIn:
    """Captures "graphs" that run the eager step over all of the bucket's rows."""

    def __init__(self) -> None:
        self.runner: ModelStepRunner | None = None
        self.captured: list[int] = []
        self.replayed: list[int] = []

    def __call__(self, size: int) -> Replay:
        assert self.runner is not None
        graphs = self.runner.graphs
        self.captured.append(size)

        def replay():
            self.replayed.append(size)
            return graphs.eager(size)

        return replay


def check_rows(runner: ModelStepRunner, scheduler: Scheduler) -> None:
    """Running rows hold their last token at their next position; every other row is idle."""
    tokens, positions = runner.table.host("token"), runner.table.host("position")
    for row in range(runner.rows):
        seq = scheduler.running.get(row)
        if seq is not None and seq.computed:
            assert (tokens[row], positions[row]) == (seq.computed[-1], seq.next_position), row
        elif seq is None:
            assert (tokens[row], positions[row]) == (runner.loaded.pad_token_id, runner.shape.scratch), row


@pytest.fixture(scope="module", params=["tiny", "tiny-gemma2"])
def preset_model(request) -> LoadedModel:
    return load_model(Settings(model=request.param))


def test_steps_over_buckets_with_idle_rows_equal_generate_alone(preset_model):
    loaded = preset_model
    stand_in = EagerStandIn()
    runner = ModelStepRunner(loaded, RunnerConfig(rows=6, max_prompt_tokens=64, max_new_tokens=30),
                             graph_capture=stand_in)
    stand_in.runner = runner
    runner.capture_graphs()
    assert stand_in.captured == [6, 4, 2, 1] and runner.graphs.captured == [1, 2, 4, 6]
    assert sorted(stand_in.replayed) == [1, 2, 4, 6] and runner.graphs.failure is None  # the warm-up check
    stand_in.replayed.clear()
    scheduler = Scheduler(6, prefill_token_budget=2 * (loaded.image_seq_length + 20))
    core = EngineCore(scheduler, runner, lambda events: None, NullObserver(), lambda exc: False, lambda exc: False)
    widths: list[int] = []
    decode = runner.decode
    runner.decode = lambda seqs, width: (widths.append(width), decode(seqs, width))[1]  # type: ignore[method-assign]
    rng = random.Random(5)
    plans = [(rng.randrange(0, 25), make_input(loaded, rng.choice(PROMPTS), rng.randrange(1000)),
              rng.randrange(1, 24), rng.random() < 0.2) for _ in range(10)]
    seqs: list[Sequence | None] = [None] * len(plans)
    for step in range(400):
        for i, (arrive, item, max_new, cancel) in enumerate(plans):
            if arrive == step:
                seqs[i] = Sequence(len(item.input_ids), max_new, frozenset(loaded.eos_token_ids), item)
                core.submit(seqs[i])
            if cancel and arrive + 3 == step and seqs[i] is not None:
                seqs[i].cancel_reason = "disconnected"
        assert core.step_once()
        check_rows(runner, scheduler)
        if step > 25 and scheduler.idle:
            break
    # Steps of 3 or 5 rows ran in the bucket above, its extra rows idle.
    assert {3, 5} & set(widths) and {4, 6} & set(stand_in.replayed)
    assert len(stand_in.replayed) == len(widths)
    for (_, item, max_new, cancel), seq in zip(plans, seqs, strict=True):
        assert seq is not None and seq.done
        if seq.state is State.FINISHED:
            assert seq.output_tokens == generate_alone(loaded, item, max_new)
        else:
            assert cancel
