"""Starting, watching and stopping the servers under test: loopback only, own process group, no leftovers.

Every server runs in a new session (its own process group), so stopping it stops the helpers it spawned
too (LitServe's inference worker and queue manager, multiprocessing's resource tracker). Memory is read
from /proc for the whole group: VmHWM (peak resident set) and VmRSS, summed over its processes.
"""

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

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


def start_server(name: str, command: list[str], env: dict[str, str], ready_path: str, log_path: Path,
                 port: int, timeout_s: float = 300.0) -> Server:
    """Start `command` (which must listen on HOST:port) and wait until GET ready_path answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    # The log goes to a file, never a pipe: an undrained pipe would block a chatty server mid-benchmark.
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    server = Server(name, process, port, log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} while starting; see "
                                   f"{log_path}:\n" + tail(log_path))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.base_url + ready_path, timeout=2.0).status_code == 200:
                    return server
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {timeout_s:.0f} s; see {log_path}:\n"
                                   + tail(log_path))
            time.sleep(0.5)
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: Server, grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group, wait, then SIGKILL whatever is left of it."""
    pgid = server.pid  # start_new_session: the leader's pid is the group id
    _signal_group(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=grace_s)
    # Children (workers, managers) may outlive the leader: wait for the group to empty, then kill it.
    deadline = time.monotonic() + 5.0
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_pids(pgid):
        _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=5.0)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_mb(pgid: int, key: str = "VmHWM") -> float:
    """VmHWM (peak) or VmRSS (now) summed over the process group, in MB (10^6 bytes).

    A sum over processes counts pages they share (e.g. torch's libraries) once per process: for
    multi-process servers it is an upper bound of what the machine had to hold.
    """
    return sum(_status_kb(pid, key) for pid in group_pids(pgid)) * 1024 / 1e6


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def running(name: str, command: list[str], env: dict[str, str], ready_path: str, log_path: Path,
            port: int, timeout_s: float = 300.0) -> Iterator[Server]:
    server = start_server(name, command, env, ready_path, log_path, port, timeout_s)
    try:
        yield server
    finally:
        stop_server(server)


def python() -> str:
    """The interpreter running the benchmark: servers run in the same environment."""
    return sys.executable


def loadavg() -> float:
    """1-minute load average: the benchmark shares the machine, and this says how much it did."""
    return float(Path("/proc/loadavg").read_text().split()[0])


# --------------------------------------------------------------------------------------------------
# Who used the CPU during a window: the server, the load generator, or something else on the machine.

_TICK = os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def _group_cpu(pgid: int | None) -> float:
    """utime + stime of the live processes of a group, in seconds."""
    if pgid is None:
        return 0.0
    total = 0
    for pid in group_pids(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """CPU cores used during a window by a process group (the server), by this process, and by others.

    `other_cores` is the machine's busy time minus the two: on a shared machine it says how much of the
    2 cores the benchmark did not have. Work of processes that exit inside the window is not attributed
    to the group, so keep the group alive across the window.
    """

    def __init__(self, pgid: int | None = None):
        self.pgid = pgid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float, float]:
        busy, steal = _machine_cpu()
        return time.monotonic(), busy, steal, _group_cpu(self.pgid), _self_cpu()

    def stop(self) -> dict[str, float]:
        end = self._read()
        elapsed, busy, steal, group, own = (b - a for a, b in zip(self._start, end, strict=True))
        elapsed = max(elapsed, 1e-9)
        return {
            "server_cores": group / elapsed,
            "self_cores": own / elapsed,
            "other_cores": max(0.0, busy - group - own) / elapsed,
            "steal_cores": steal / elapsed,
        }


def wait_until_quiet(max_wait_s: float, threshold_cores: float = 0.3, sample_s: float = 3.0) -> float:
    """Wait (up to max_wait_s) until other processes use less than threshold_cores; return that usage."""
    deadline = time.monotonic() + max_wait_s
    while True:
        meter = CpuMeter()
        time.sleep(sample_s)
        other = meter.stop()["other_cores"]
        if other < threshold_cores or time.monotonic() >= deadline:
            return other
