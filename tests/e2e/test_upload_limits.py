"""Oversized uploads are refused while they stream in: never read to the end, never held in memory."""

from __future__ import annotations

import select
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.served import served

MB = 1024 * 1024
LIMIT = 4 * MB


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"PALIGEMMA_MAX_IMAGE_BYTES": str(LIMIT - MB), "PALIGEMMA_MAX_REQUEST_BYTES": str(LIMIT)}
    with served(tmp_path_factory.mktemp("upload-limits"), env=env) as s:
        yield s


def _connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=30)


def _read_status(sock: socket.socket) -> int:
    data = b""
    deadline = time.monotonic() + 30
    while b"\r\n" not in data and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def _vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_declared_2gb_body_is_refused_before_any_byte_is_read(server):
    with _connect(server.url) as sock:
        sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                     b"Content-Length: 2147483648\r\n\r\n")
        assert _read_status(sock) == 413


def test_a_2gb_chunked_upload_is_cut_off_near_the_limit(server):
    """Stream up to 2 GB without a length: the server must answer 413 long before the end."""
    peak_before = _vm_rss_mb(server.process.pid)
    chunk = b"0" * MB
    sent = 0
    with _connect(server.url) as sock:
        sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=zz\r\n\r\n")
        head = b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        status = None
        while sent < 2048 * MB:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                status = _read_status(sock)
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                status = _read_status(sock) if select.select([sock], [], [], 1)[0] else None
                break
            sent += len(chunk)
    assert status == 413
    assert sent < 64 * MB, f"the server read {sent / MB:.0f} MB of a body limited to {LIMIT / MB:.0f} MB"
    assert _vm_rss_mb(server.process.pid) - peak_before < 64
    assert httpx.get(f"{server.url}/readyz").status_code == 200
