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
    AsyncStream,
    BadRequestError,
    PaliGemmaClient,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    Stream,
    StreamError,
    TextResponse,
)
from paligemma_client.convert import decode_rle
from paligemma_client.models import RLE
from paligemma_client.streaming import Event, EventDecoder
from pycocotools import mask as coco_mask
from pydantic import BaseModel

import app.schemas as server_schemas
from app.api.errors import service_error_body
from app.api.streaming import sse
from app.errors import InferenceFailed
from tests.served import free_port

TEXT_RESULT = {
    "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "image": {"width": 4, "height": 3},
    "finish_reason": "stop", "raw_text": "hi", "warning": None, "adapter": None, "text": "hi",
    "timings": {"prepare_ms": 1.0, "queue_and_inference_ms": 2.0, "postprocess_ms": 0.0, "total_ms": 3.0},
}
TASKS = ("caption", "vqa", "ocr", "detect", "segment", "generate")
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


# Event streams as the server writes them (its own `sse` and error envelope), read by the client.
DELTAS = ("a red", " box", " on white")
EVENT_STREAM = {"content-type": "text/event-stream", "x-request-id": "s1"}
STREAMED = b"".join(sse("delta", {"text": text}) for text in DELTAS) + sse("result", TEXT_RESULT)
FAILED = sse("delta", {"text": "a red"}) + sse("error", service_error_body(
    InferenceFailed("the model failed on this request"), "s1"))


def streaming_server(body: bytes, seen: list[httpx.Request] | None = None) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(200, content=body, headers=EVENT_STREAM)

    return httpx.MockTransport(handle)


def test_events_are_decoded_as_the_standard_reads_them():
    decoder = EventDecoder()
    lines = [": comment", "event: delta", "data:{\"text\":", "data: \"x\"}", "id: 7", "", "", "data: plain", ""]
    events = [event for line in lines if (event := decoder.feed(line)) is not None]
    assert events == [Event("delta", '{"text":\n"x"}'), Event("message", "plain")]


def test_a_stream_gives_the_deltas_then_the_typed_result():
    seen: list[httpx.Request] = []
    body = b": a comment\n\n" + sse("keepalive", {}) + STREAMED  # what the client does not know is skipped
    with PaliGemmaClient("http://server", transport=streaming_server(body, seen)) as client, \
            client.caption_stream(b"img", long=True) as stream:
        assert isinstance(stream, Stream) and stream.request_id == "s1"
        with pytest.raises(RuntimeError, match="not been read to its end"):
            stream.result  # noqa: B018
        assert list(stream) == list(DELTAS)
        assert stream.text == "a red box on white"
        assert isinstance(stream.result, TextResponse) and stream.result.model_dump(mode="json") == TEXT_RESULT
        assert list(stream.text_deltas()) == [] and stream.get_result() is stream.result  # read once
    [request] = seen
    body_sent = request.read()
    assert b'name="stream"\r\n\r\ntrue' in body_sent and b'name="long"\r\n\r\ntrue' in body_sent
    assert request.headers["accept"] == "text/event-stream"


def test_get_result_reads_the_whole_stream():
    with PaliGemmaClient("http://server", transport=streaming_server(STREAMED)) as client:
        stream = client.generate_stream(b"img", "caption en")
        assert stream.get_result().raw_text == "hi" and stream.text == "a red box on white"


def test_an_error_event_raises_the_servers_error_after_the_deltas_before_it():
    with PaliGemmaClient("http://server", transport=streaming_server(FAILED)) as client:
        stream = client.ocr_stream(b"img")
        deltas = []
        with pytest.raises(StreamError) as raised:
            for delta in stream:
                deltas.append(delta)
    assert deltas == ["a red"]
    error = raised.value
    assert (error.type, error.message, error.request_id) == ("internal_error", "the model failed on this request",
                                                             "s1")
    assert str(error) == "internal_error (inside the stream): the model failed on this request [request id s1]"
    with pytest.raises(StreamError):
        stream.result  # noqa: B018


def test_a_stream_cut_off_before_its_result_is_a_connection_error():
    with PaliGemmaClient("http://server", transport=streaming_server(sse("delta", {"text": "a"}))) as client, \
            pytest.raises(APIConnectionError, match="the stream ended before its result"):
        client.caption_stream(b"img").get_result()


def test_a_stream_is_refused_before_it_begins_after_retrying_a_full_queue():
    invalid = {"error": {"type": "validation_error", "message": "`max_new_tokens` must be <= 256",
                         "param": "max_new_tokens", "request_id": "r3"}}
    transport, times = scripted(httpx.Response(429, json=QUEUE_FULL, headers={"Retry-After": "0"}),
                                httpx.Response(422, json=invalid))
    with PaliGemmaClient("http://server", transport=transport) as client, \
            pytest.raises(BadRequestError) as raised:
        client.caption_stream(b"img", max_new_tokens=1000)  # raises here, before any iteration
    assert len(times) == 2
    assert (raised.value.status_code, raised.value.param, raised.value.request_id) == (422, "max_new_tokens", "r3")


def test_the_async_stream_reads_the_same_events():
    async def run() -> tuple[list[str], TextResponse, list[str], StreamError]:
        async with AsyncPaliGemmaClient("http://server", transport=streaming_server(STREAMED)) as client:
            async with await client.caption_stream(b"img") as stream:
                assert isinstance(stream, AsyncStream)
                deltas = [delta async for delta in stream]
            result = stream.result
        async with AsyncPaliGemmaClient("http://server", transport=streaming_server(FAILED)) as client:
            failing = await client.vqa_stream(b"img", "what?")
            before: list[str] = []
            with pytest.raises(StreamError) as raised:
                async for delta in failing:
                    before.append(delta)
        return deltas, result, before, raised.value

    deltas, result, before, error = asyncio.run(run())
    assert deltas == list(DELTAS) and result.model_dump(mode="json") == TEXT_RESULT
    assert before == ["a red"] and error.request_id == "s1" and error.type == "internal_error"


def test_sampling_options_are_sent_and_unknown_ones_refused():
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=TEXT_RESULT)

    with PaliGemmaClient("http://server", transport=httpx.MockTransport(handle)) as client:
        client.caption(b"img", temperature=0.7, top_p=0.9, top_k=40, seed=0, max_new_tokens=None, adapter="att")
        with pytest.raises(TypeError, match="'temprature'; the options every task takes are max_new_tokens, "
                                            "temperature, top_p, top_k, seed"):
            client.ocr(b"img", temprature=0.7)  # type: ignore[call-arg]
    [request] = seen
    body = request.read()
    for name, value in (("temperature", b"0.7"), ("top_p", b"0.9"), ("top_k", b"40"), ("seed", b"0"),
                        ("adapter", b"att")):
        assert f'name="{name}"'.encode() + b"\r\n\r\n" + value in body
    assert b"max_new_tokens" not in body and b'name="stream"' not in body


def test_the_cli_passes_its_adapter_to_every_task():
    from paligemma_client.cli import build_parser, task_arguments

    for argv in (["caption", "p.jpg"], ["detect", "p.jpg", "cat"], ["generate", "p.jpg", "ocr"]):
        _, options = task_arguments(build_parser().parse_args([*argv, "--adapter", "receipts"]))
        assert options["adapter"] == "receipts"
        _, options = task_arguments(build_parser().parse_args(argv))
        assert options["adapter"] is None  # not sent: the base


def _public(cls: type) -> list[str]:
    return [name for name in vars(cls) if not name.startswith("_")]


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


def _public(cls: type) -> list[str]:
    return [name for name in vars(cls) if not name.startswith("_")]


def test_the_async_client_has_the_sync_clients_methods():
    assert _public(AsyncPaliGemmaClient) == _public(PaliGemmaClient)
    streamed = [name.removesuffix("_stream") for name in _public(PaliGemmaClient) if name.endswith("_stream")]
    assert streamed == list(TASKS)
    for name in _public(PaliGemmaClient):
        sync, twin = inspect.signature(getattr(PaliGemmaClient, name)), getattr(AsyncPaliGemmaClient, name)
        assert inspect.iscoroutinefunction(twin), name
        assert inspect.signature(twin).parameters == sync.parameters, name
        # A `_stream` method returns Stream[X] and its twin AsyncStream[X]; the rest return the same type.
        expected = str(sync.return_annotation).replace("Stream[", "AsyncStream[")
        assert inspect.signature(twin).return_annotation == expected, name


def test_the_async_stream_has_the_sync_streams_methods():
    assert _public(AsyncStream) == _public(Stream) == ["text_deltas", "get_result", "close"]
    for name in _public(Stream):
        assert inspect.signature(getattr(AsyncStream, name)).parameters == \
            inspect.signature(getattr(Stream, name)).parameters, name
    assert inspect.isgeneratorfunction(Stream.text_deltas) and inspect.isasyncgenfunction(AsyncStream.text_deltas)
    assert inspect.iscoroutinefunction(AsyncStream.get_result) and inspect.iscoroutinefunction(AsyncStream.close)


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
