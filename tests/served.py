"""A real server process on a loopback port, for end-to-end tests. Always cleaned up."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FAULT_LAUNCHER = Path(__file__).with_name("fault_launcher.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@contextlib.contextmanager
def served(tmp_path: Path, env: dict[str, str] | None = None, command: list[str] | None = None,
           faults: bool = False, ready: bool = True) -> Iterator[Server]:
    """Start `python -m app` (or `command`, or the fault-injecting launcher) and stop it afterwards."""
    port = free_port()
    environment = {**os.environ, "PALIGEMMA_HOST": "127.0.0.1", "PALIGEMMA_PORT": str(port),
                   "PYTHONUNBUFFERED": "1", **(env or {})}
    if command is None:
        command = [sys.executable, str(FAULT_LAUNCHER)] if faults else [sys.executable, "-m", "app"]
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
