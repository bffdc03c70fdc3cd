"""The client's own logic, without a server: retries, error mapping, the mirror of the server's schemas,
RLE decoding, and the sync/async twins staying twins."""

from __future__ import annotations

import asyncio
import inspect
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import numpy as np
import paligemma_client.models as client_models
import pytest
from paligemma_client import (
    APIConnectionError,
    AsyncPaliGemmaClient,
    PaliGemmaClient,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)
from paligemma_client.convert import decode_rle
from paligemma_client.models import RLE
from pycocotools import mask as coco_mask
from pydantic import BaseModel

import app.schemas as server_schemas
from tests.served import free_port

TEXT_RESULT = {
    "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "image": {"width": 4, "height": 3},
    "finish_reason": "stop", "raw_text": "hi", "warning": None, "text": "hi",
    "timings": {"prepare_ms": 1.0, "queue_and_inference_ms": 2.0, "postprocess_ms": 0.0, "total_ms": 3.0},
}
QUEUE_FULL = {"error": {"type": "queue_full", "message": "the queue is full", "param": None, "request_id": "r1"}}


def scripted(*responses: httpx.Response) -> tuple[httpx.MockTransport, list[float]]:
    """A transport answering with `responses` in turn, noting when each request came."""
    queue = list(responses)
    times: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        return queue.pop(0)

    return httpx.MockTransport(handle), times


def test_429_is_retried_after_retry_after():
    transport, times = scripted(httpx.Response(429, json=QUEUE_FULL, headers={"Retry-After": "0.2"}),
                                httpx.Response(429, json=QUEUE_FULL, headers={"Retry-After": "0.1"}),
                                httpx.Response(200, json=TEXT_RESULT))
    with PaliGemmaClient("http://server", transport=transport) as client:
        assert client.caption(b"\x89PNG\r\n\x1a\n...").text == "hi"
    assert len(times) == 3
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.1


def test_retries_are_bounded_and_the_last_error_is_raised():
    transport, times = scripted(*[httpx.Response(429, json=QUEUE_FULL, headers={"Retry-After": "0"})] * 3)
    with PaliGemmaClient("http://server", transport=transport, max_retries=2) as client, \
            pytest.raises(RateLimitError) as raised:
        client.caption(b"img")
    assert len(times) == 3  # the first try and two retries
    assert raised.value.retry_after == "0" and raised.value.request_id == "r1"
    assert str(raised.value) == "429 queue_full: the queue is full [request id r1]"


def test_waits_are_capped_and_http_dates_understood():
    later = format_datetime(datetime.now(timezone.utc) + timedelta(hours=1), usegmt=True)
    transport, times = scripted(httpx.Response(429, json=QUEUE_FULL, headers={"Retry-After": later}),
                                httpx.Response(200, json=TEXT_RESULT))
    with PaliGemmaClient("http://server", transport=transport, max_retry_wait_s=0.1) as client:
        client.caption(b"img")
    assert 0.1 <= times[1] - times[0] < 5


def test_a_503_is_retried_only_when_it_says_when():
    loading = {"error": {"type": "not_ready", "message": "loading", "param": None, "request_id": "r2"}}
    transport, times = scripted(httpx.Response(503, json=loading, headers={"Retry-After": "0"}),
                                httpx.Response(503, json=loading))
    with PaliGemmaClient("http://server", transport=transport) as client, \
            pytest.raises(ServiceUnavailableError):
        client.caption(b"img")
    assert len(times) == 2


def test_an_error_page_that_is_not_the_envelope_still_raises_with_its_text():
    transport, _ = scripted(httpx.Response(502, text="<html>Bad Gateway</html>", headers={"x-request-id": "p1"}))
    with PaliGemmaClient("http://server", transport=transport) as client, pytest.raises(ServerError) as raised:
        client.ocr(b"img")
    assert raised.value.status_code == 502 and "Bad Gateway" in raised.value.message
    assert raised.value.request_id == "p1"


def test_an_unreachable_server_is_a_connection_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with PaliGemmaClient(url, max_retries=0) as client, pytest.raises(APIConnectionError) as raised:
        client.caption(b"img")
    assert url in str(raised.value)


def test_the_async_client_retries_too():
    queue = [httpx.Response(429, json=QUEUE_FULL, headers={"Retry-After": "0"}), httpx.Response(200, json=TEXT_RESULT)]

    async def handle(request: httpx.Request) -> httpx.Response:
        return queue.pop(0)

    async def run() -> str:
        async with AsyncPaliGemmaClient("http://server", transport=httpx.MockTransport(handle)) as client:
            return (await client.caption(b"img")).text

    assert asyncio.run(run()) == "hi" and not queue


def test_url_and_key_come_from_the_environment(monkeypatch):
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=TEXT_RESULT)

    monkeypatch.setenv("PALIGEMMA_URL", "http://elsewhere:9000/")
    monkeypatch.setenv("PALIGEMMA_API_KEY", "k")
    with PaliGemmaClient(transport=httpx.MockTransport(handle)) as client:
        client.caption(b"img", long=True, max_new_tokens=5)
    [request] = seen
    assert str(request.url) == "http://elsewhere:9000/v1/caption"
    assert request.headers["authorization"] == "Bearer k"
    body = request.read()
    assert b'name="long"\r\n\r\ntrue' in body and b'name="max_new_tokens"\r\n\r\n5' in body


def _models(module) -> dict[str, type[BaseModel]]:
    return {name: cls for name, cls in vars(module).items()
            if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == module.__name__
            and not name.startswith("_")}


def _shape(cls: type[BaseModel]) -> dict[str, tuple[bool, str]]:
    return {name: (field.is_required(), repr(field.annotation).replace(f"{cls.__module__}.", ""))
            for name, field in cls.model_fields.items()}


def test_client_models_mirror_the_servers_schemas_both_ways():
    server, client = _models(server_schemas), _models(client_models)
    server.pop("Health")  # a probe's body, not something the client reads
    assert sorted(server) == sorted(client)
    for name, cls in server.items():
        assert _shape(client[name]) == _shape(cls), name


def test_the_async_client_has_the_sync_clients_methods():
    public = [name for name in vars(PaliGemmaClient) if not name.startswith("_") and name != "close"]
    for name in public:
        sync, twin = getattr(PaliGemmaClient, name), getattr(AsyncPaliGemmaClient, name)
        assert inspect.iscoroutinefunction(twin), name
        assert inspect.signature(twin) == inspect.signature(sync), name


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48), (300, 200)])
def test_rle_decoding_equals_pycocotools(shape):
    rng = np.random.default_rng(shape[0])
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = rng.random(shape) < density
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle = RLE(size=[int(v) for v in encoded["size"]], counts=encoded["counts"].decode())
        decoded = decode_rle(rle)
        assert decoded.dtype == bool
        assert np.array_equal(decoded, coco_mask.decode(encoded).astype(bool))
