"""Image URLs against a served process: a slow image host holds fetches, never the model queue, and a
client that leaves while its image is fetched is counted like any other that leaves.

The image host is a real HTTP server on 127.0.0.1 (listed exactly, so its loopback address is allowed)
whose `/held.png` answers only when the test lets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.helpers import metric_value
from tests.images import jpeg
from tests.loopback import loopback_server
from tests.served import served

IMAGE = jpeg(64, 48)


@dataclass
class ImageHost:
    port: int
    release: threading.Event = field(default_factory=threading.Event)  # `/held.png` answers once set
    held: int = 0  # requests for `/held.png` that arrived
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def origin(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.origin}/{path}"

    def wait_held(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while self.held < count:
            assert time.monotonic() < deadline, f"{self.held} of {count} fetches arrived"
            time.sleep(0.02)


class _Handler(http.server.BaseHTTPRequestHandler):
    host: ImageHost

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/held.png":
            with self.host.lock:
                self.host.held += 1
            self.host.release.wait(60)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the fetch may have been abandoned
            self.wfile.write(IMAGE)


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    handler = type("ImageHostHandler", (_Handler,), {})
    with loopback_server(handler) as server:
        handler.host = ImageHost(server.server_address[1])
        try:
            yield handler.host
        finally:
            handler.host.release.set()  # before the shutdown joins the handlers that wait for it


def _json_caption(url: str) -> dict:
    return {"image": url, "max_new_tokens": 2}


def test_slow_image_urls_hold_fetch_slots_not_the_model_queue(tmp_path, image_host):
    slow_hosts = 6  # as many fetches as the model queue has places
    env = {"PALIGEMMA_IMAGE_URL_HOSTS": image_host.origin, "PALIGEMMA_MAX_QUEUE": str(slow_hosts),
           "PALIGEMMA_MAX_URL_FETCHES": str(slow_hosts), "PALIGEMMA_IMAGE_URL_TIMEOUT_S": "60"}
    with served(tmp_path, env=env) as server:
        async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response]:
            limits = httpx.Limits(max_connections=slow_hosts + 5)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                slow = [asyncio.create_task(client.post(f"{server.url}/v1/caption",
                                                        json=_json_caption(image_host.url("held.png"))))
                        for _ in range(slow_hosts)]
                await asyncio.to_thread(image_host.wait_held, slow_hosts)  # every fetch hangs at the host
                # The model queue's places are free for clients who send their image: all of them pass.
                uploads = []
                for _ in range(4):
                    uploads.append(await client.post(
                        f"{server.url}/v1/caption", files={"image": ("a.jpg", IMAGE, "image/jpeg")},
                        data={"max_new_tokens": "2"}))
                # One more URL while the bound's worth are being fetched: refused at once, by that bound.
                third = await client.post(f"{server.url}/v1/caption", json=_json_caption(image_host.url("a.png")))
                image_host.release.set()
                return uploads, list(await asyncio.gather(*slow)), third

        uploads, slow, third = asyncio.run(scenario())
        assert [r.status_code for r in uploads] == [200] * 4, [r.text for r in uploads]
        assert [r.status_code for r in slow] == [200] * slow_hosts, [r.text for r in slow]
        assert third.status_code == 429, third.text
        error = third.json()["error"]
        assert error["type"] == "url_fetches_full" and error["param"] == "image"
        assert "PALIGEMMA_MAX_URL_FETCHES" in error["message"] and "send the image itself" in error["message"]
        assert third.headers["retry-after"]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric_value(metrics, "paligemma_rejections_total", reason="url_fetches_full") == 1
        assert metric_value(metrics, "paligemma_rejections_total", reason="queue_full") == 0


def test_a_client_that_leaves_while_its_image_is_fetched_is_counted_as_disconnected(tmp_path, image_host):
    with served(tmp_path, env={"PALIGEMMA_IMAGE_URL_HOSTS": image_host.origin}) as server:
        body = json.dumps(_json_caption(image_host.url("held.png"))).encode()
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            image_host.wait_held(1)  # the server is fetching its image: the client hangs up now
        metrics = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{server.url}/metrics").text
            if metric_value(metrics, "paligemma_requests_total", endpoint="/v1/caption", status="499"):
                break
            time.sleep(0.05)
        image_host.release.set()
        assert metric_value(metrics, "paligemma_requests_total", endpoint="/v1/caption", status="499") == 1
        assert metric_value(metrics, "paligemma_rejections_total", reason="disconnected") == 1
        assert httpx.get(f"{server.url}/readyz").status_code == 200
