"""The served process itself: both entry points, start-up failures, fatal worker errors."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.images import encode, jpeg
from tests.served import free_port, served


def _caption(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/caption", files={"image": ("a.jpg", jpeg(), "image/jpeg")},
                      data={"max_new_tokens": "4"}, timeout=60)


def test_python_dash_m_app_serves_and_exits_zero_on_sigterm(tmp_path):
    with served(tmp_path) as server:
        response = _caption(server.url)
        assert response.status_code == 200 and response.json()["model"] == "tiny"
        assert server.terminate() == 0
    assert "RANDOM weights" in server.log()
    # Optional libraries' import-time warnings (app.__main__.IMPORT_NOISE) stay out of the log.
    assert "Failed to load" not in server.log() and "is an Enum subclass" not in server.log()


def test_the_console_script_serves_too(tmp_path):
    script = Path(sys.executable).with_name("paligemma-server")
    with served(tmp_path, command=[str(script)]) as server:
        assert _caption(server.url).status_code == 200
        assert server.terminate() == 0


def test_a_bad_setting_stops_start_up_naming_the_variable():
    result = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PALIGEMMA_MAX_BATCH_SIZE": "zero",
                                 "PALIGEMMA_PORT": "70000"})
    assert result.returncode == 2
    assert "PALIGEMMA_MAX_BATCH_SIZE" in result.stderr and "PALIGEMMA_PORT" in result.stderr


def test_api_keys_that_hold_no_key_stop_start_up_naming_the_variable():
    # Set, but to separators only: read as no keys, it would quietly turn authentication off.
    result = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PALIGEMMA_API_KEYS": " , ",
                                 "PALIGEMMA_HOST": "127.0.0.1", "PALIGEMMA_PORT": str(free_port())})
    assert result.returncode == 2
    assert "PALIGEMMA_API_KEYS" in result.stderr and "holds no key" in result.stderr


@pytest.mark.parametrize("queue", [1, 5])  # fewer places than there are task paths to warm up
def test_a_small_queue_still_starts_and_serves(tmp_path, queue):
    with served(tmp_path, env={"PALIGEMMA_MAX_QUEUE": str(queue)}) as server:
        assert _caption(server.url).status_code == 200
        assert "warm-up: every task path ran" in server.log()


def test_a_model_that_cannot_be_loaded_exits_one(tmp_path):
    env = {"PALIGEMMA_MODEL": str(tmp_path / "no-such-checkpoint"), "HF_HUB_OFFLINE": "1"}
    with served(tmp_path, env=env, ready=False) as server:
        assert server.process.wait(timeout=120) == 1
    assert "start-up failed" in server.log()


def test_an_unrecoverable_worker_error_turns_readyz_503_and_exits_non_zero(tmp_path):
    with served(tmp_path, faults=True) as server:
        red = encode(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (32, 32), (255, 0, 0)), "PNG")
        response = httpx.post(f"{server.url}/v1/caption", files={"image": ("r.png", red, "image/png")},
                              timeout=60)
        assert response.status_code == 503, response.text
        statuses = []
        deadline = time.monotonic() + 30
        while server.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                statuses.append(httpx.get(f"{server.url}/readyz", timeout=2).status_code)
            time.sleep(0.02)
        assert server.process.wait(timeout=30) == 1
        assert 200 not in statuses
    assert "cannot recover" in server.log()
