"""A real Prometheus on a loopback port, for tests: started, waited for until it says it is ready, stopped.

Prometheus listens before it can answer: until its storage is open and its configuration loaded, the
query API answers 503 "Service Unavailable" in plain text. `/-/ready` turns 200 only once queries work,
so that is what the tests wait for, not the first answer on the port.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.served import free_port


@contextlib.contextmanager
def running_prometheus(binary: str, config: Path, directory: Path, timeout_s: float = 60) -> Iterator[str]:
    """Run Prometheus on `config`, its data and log in `directory`; yields its URL once it is ready."""
    port = free_port()
    log_path = directory / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited with {process.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after {timeout_s} s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(url: str, expression: str) -> list[dict]:
    """The result of an instant query (the vector's samples)."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]
