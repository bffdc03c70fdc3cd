from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# The test layers, one folder each; every test gets its folder's marker (`make test-fast` runs tests/unit).
LAYERS = {
    "unit": "pure units and fakes: no model weights, no served process",
    "model": "a real (tiny) PaliGemma in this process: the engine, the app through its ASGI client",
    "e2e": "served processes (python -m app), real clients, Prometheus, curl, a browser",
    "deployment": "the deployment files, checked by their tools",
}


def pytest_configure(config: pytest.Config) -> None:
    for layer, what in LAYERS.items():
        config.addinivalue_line("markers", f"{layer}: {what}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        layer = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of the layer folders {sorted(LAYERS)}")
        item.add_marker(layer)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PaliGemma trained to emit known detect/segment outputs, saved with save_pretrained."""
    from tests.trained_model import train  # torch: imported by the layers that use it, not by every run

    return train(tmp_path_factory.mktemp("trained-paligemma"))


@dataclass(frozen=True)
class TrainedServer:
    url: str
    key: str


@pytest.fixture(scope="session")
def trained_server(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedServer]:
    """One served process (`python -m app`) shared by the client, CLI, annotated-image and browser tests:
    the trained checkpoint, a mask decoder with seeded random weights, and an API key."""
    from tests.helpers import random_mask_decoder
    from tests.served import served

    directory = tmp_path_factory.mktemp("trained-server")
    key = "test-key-0123"
    env = {"PALIGEMMA_MODEL": str(trained_checkpoint), "PALIGEMMA_API_KEYS": key,
           "PALIGEMMA_MASK_DECODER": str(random_mask_decoder(directory))}
    with served(directory, env=env) as server:
        yield TrainedServer(server.url, key)
