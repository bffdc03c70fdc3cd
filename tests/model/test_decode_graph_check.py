"""Decode graphs check themselves at warm-up: a graph whose logits disagree with the eager step's is
discarded, the server decodes eagerly and says so (the log, /v1/models, a gauge).

CUDA graphs cannot be captured on a CPU, so "graphs" come through the runner's capture seam: a wrong
one (what a capture on the wrong slice of the row table would compute: two rows' logits swapped), a
subtly wrong one (logits nudged past float32's tolerance), and a right one (the eager step over the
bucket, which is what a graph computes).
"""

from __future__ import annotations

import logging

import pytest
import torch

from app.engine.graphs import disagreement
from app.engine.runner import ModelStepRunner
from app.main import create_app
from app.settings import Settings
from tests.helpers import files, metric_value, serve
from tests.images import jpeg


def runner_with(make_replay):
    """A runner factory whose graph capture hands out `make_replay(graphs, size)`."""

    def factory(loaded, config):
        holder: dict[str, ModelStepRunner] = {}

        def capture(size: int):
            return make_replay(holder["runner"].graphs, size)

        holder["runner"] = ModelStepRunner(loaded, config, graph_capture=capture)
        return holder["runner"]

    return factory


def swapped_rows(graphs, size):
    def replay():
        logits = graphs.eager(size)
        return logits[torch.arange(size).roll(1)] if size > 1 else -logits

    return replay


def nudged(graphs, size):
    return lambda: graphs.eager(size) * 1.001


def right(graphs, size):
    return lambda: graphs.eager(size)


def caption(client) -> str:
    response = client.post("/v1/caption", files=files(jpeg(64, 48, seed=3)), data={"max_new_tokens": "8"})
    assert response.status_code == 200, response.text
    return response.json()["raw_text"]


SETTINGS = Settings(api_keys=(), max_batch_size=4)


@pytest.fixture(scope="module")
def eager_caption() -> str:
    with serve(SETTINGS) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["decode_graphs"] == [] and card["decode_graphs_failure"] is None
        return caption(client)


@pytest.mark.parametrize("wrong", [swapped_rows, nudged])
def test_a_graph_that_disagrees_with_the_eager_step_is_discarded_and_said_so(wrong, eager_caption, caplog):
    app = create_app(SETTINGS, runner_factory=runner_with(wrong))
    with caplog.at_level(logging.ERROR, logger="app.engine.runner"), serve(app=app) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["decode_graphs"] == []
        assert "disagree with the eager step" in card["decode_graphs_failure"]
        assert metric_value(client.get("/metrics").text, "paligemma_decode_graphs_failed") == 1
        assert caption(client) == eager_caption  # served eagerly, correctly
    assert any("decode graphs discarded" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_graphs_that_agree_serve_every_step(eager_caption):
    replayed: list[int] = []

    def counted(graphs, size):
        replay = right(graphs, size)
        return lambda: (replayed.append(size), replay())[1]

    app = create_app(SETTINGS, runner_factory=runner_with(counted))
    with serve(app=app) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["decode_graphs"] == [1, 2, 4] and card["decode_graphs_failure"] is None
        assert metric_value(client.get("/metrics").text, "paligemma_decode_graphs_failed") == 0
        before = len(replayed)
        assert caption(client) == eager_caption
        assert len(replayed) > before  # the request's decode steps replayed the "graph"


def test_the_tolerance_follows_the_dtype_and_any_argmax_change_fails():
    eager = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 5
    assert disagreement(eager.clone(), eager, torch.float32) is None
    assert "differ by" in disagreement(eager * 1.001, eager, torch.float32)
    assert disagreement(eager * 1.001, eager, torch.bfloat16) is None  # within bfloat16's rounding
    eager[2, :2] = torch.tensor([30.0, 29.99])  # a near tie...
    close = eager.clone()
    close[2, 1] = 30.01  # ... that the graph breaks the other way, well within bfloat16's tolerance
    assert "rows [2]" in disagreement(close, eager, torch.bfloat16)
    assert "finite" in disagreement(eager / 0, eager, torch.bfloat16)
