"""The served process writes one access-log line per request (uvicorn's own is off), with the request id
the client sent; keys are refused before the body is read."""

from __future__ import annotations

import re
import socket
import time
from urllib.parse import urlparse

import httpx

from tests.images import jpeg
from tests.served import served


def _status_of_an_unsent_body(url: str, headers: bytes) -> tuple[int, float]:
    """Send only the head of a POST that declares a 1 MB body; the status line and how long it took."""
    parsed = urlparse(url)
    started = time.monotonic()
    with socket.create_connection((parsed.hostname, parsed.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                     b"Content-Length: 1000000\r\n" + headers + b"\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), time.monotonic() - started


def test_access_log_request_ids_and_auth_before_the_body(tmp_path):
    env = {"PALIGEMMA_API_KEYS": "k1", "PALIGEMMA_DEFAULT_MAX_NEW_TOKENS": "2"}
    with served(tmp_path, env=env) as server:
        # No body byte is sent: an answer proves the key was checked before reading it.
        for header in (b"Authorization: k1\r\n", b"X-API-Key: wrong\r\n"):
            status, seconds = _status_of_an_unsent_body(server.url, header)
            assert status == 401 and seconds < 10
        ok = httpx.post(f"{server.url}/v1/caption", files={"image": ("a.jpg", jpeg(64, 48), "image/jpeg")},
                        headers={"X-API-Key": "k1", "X-Request-ID": "client-id-1"}, timeout=60)
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-id-1"
        missing = httpx.get(f"{server.url}/nothing", headers={"X-Request-ID": "client-id-2"}, timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["request_id"] == "client-id-2"
        assert server.terminate() == 0
    log = server.log()
    assert re.search(r'127\.0\.0\.1:\d+ "POST /v1/caption HTTP/1\.1" 200 \d+\.\d ms request_id=client-id-1$', log,
                     re.MULTILINE), log
    assert re.search(r'"GET /nothing HTTP/1\.1" 404 \d+\.\d ms request_id=client-id-2$', log, re.MULTILINE)
    assert len(re.findall(r'"POST /v1/caption HTTP/1\.1" 401 ', log)) == 2
    # One line per request: none from uvicorn's access log (`... - "GET /readyz HTTP/1.1" 200 OK`).
    assert log.count("request_id=client-id-1") == 1
    assert not re.search(r'" \d{3} [A-Z][a-z]', log), log
    readiness_polls = re.findall(r'"GET /readyz HTTP/1\.1" (\d{3}) ', log)
    assert readiness_polls and "200" in readiness_polls
