"""Shared test helpers: an app under a real ASGI client, readiness waits, metrics, a mask decoder file.
Images made on the fly are in tests/images.py."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


def wait_ready(client: TestClient, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout_s} s: {client.get('/readyz').json()}")


@contextlib.contextmanager
def serve(settings: Settings | None = None, ready: bool = True, app: FastAPI | None = None
          ) -> Iterator[TestClient]:
    """The real app (real model, real batcher) behind Starlette's ASGI test client, lifespan included;
    `app` serves one a test built itself."""
    app = app or create_app(settings or Settings())
    with TestClient(app, raise_server_exceptions=False) as client:
        if ready:
            wait_ready(client)
        yield client


def files(data: bytes, name: str = "image.jpg", content_type: str = "image/jpeg") -> dict:
    return {"image": (name, data, content_type)}


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent). A label with an empty value is
    the same as no such label, as Prometheus has it (the base's `adapter=""`)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if v)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_part = sample.partition("{")
        if metric != name:
            continue
        got = ",".join(sorted(part for part in label_part.rstrip("}").split(",")
                              if part and not part.endswith('=""')))
        if got == want:
            return float(value)
    return 0.0


def random_mask_decoder(directory: Path, seed: int = 7) -> Path:
    """A mask-decoder file (vae-oid.npz layout) with seeded random weights, written into `directory`."""
    spec = importlib.util.spec_from_file_location(
        "vae_weights", Path(__file__).parent / "unit" / "masks" / "vae_fixture_weights.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = directory / f"vae-random-{seed}.npz"
    np.savez(path, **module.random_vae_weights(seed))
    return path
