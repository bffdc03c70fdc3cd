"""The Python client against a served process with the trained checkpoint and a mask decoder."""

from __future__ import annotations

import asyncio
import io
import json
import signal

import httpx
import numpy as np
import pytest
from paligemma_client import (
    AsyncPaliGemmaClient,
    AuthenticationError,
    BadRequestError,
    DetectResponse,
    PaliGemmaClient,
    SegmentResponse,
    StreamError,
)
from PIL import Image
from pycocotools import mask as coco_mask

from tests.served import served
from tests.trained_model import DETECT_BINS, SEGMENT_BINS, image_bytes, training_image

WIDTH, HEIGHT = 640, 400
IMAGE = image_bytes(training_image().resize((WIDTH, HEIGHT)))


class Recording(httpx.HTTPTransport):
    """A real transport that keeps every response body, to compare typed results with the JSON sent."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        response.read()
        self.bodies.append(response.content)
        return response


@pytest.fixture(scope="module")
def recording() -> Recording:
    return Recording()


@pytest.fixture(scope="module")
def client(trained_server, recording):
    with PaliGemmaClient(trained_server.url, api_key=trained_server.key, transport=recording) as c:
        yield c


def _pixels(bins: tuple[int, int, int, int]) -> list[float]:
    y1, x1, y2, x2 = bins
    return [x1 / 1023 * WIDTH, y1 / 1023 * HEIGHT, x2 / 1023 * WIDTH, y2 / 1023 * HEIGHT]


@pytest.mark.parametrize("call", [
    lambda c: c.caption(IMAGE, max_new_tokens=16),
    lambda c: c.vqa(IMAGE, "what is it?", language="en", max_new_tokens=4),
    lambda c: c.ocr(IMAGE, max_new_tokens=4),
    lambda c: c.detect(IMAGE, "red box"),
    lambda c: c.segment(IMAGE, ["red box"]),
    lambda c: c.generate(IMAGE, "detect red box"),
], ids=["caption", "vqa", "ocr", "detect", "segment", "generate"])
def test_typed_results_equal_the_servers_json(client, recording, call):
    result = call(client)
    assert result.model_dump(mode="json") == json.loads(recording.bodies[-1])


def test_known_outputs_come_back_typed(client):
    assert client.caption(IMAGE).text == "a red box on white"
    detected = client.detect(IMAGE, ["red box"])
    assert isinstance(detected, DetectResponse)
    assert [d.label for d in detected.detections] == ["red box", "box"]
    box = detected.detections[0].box
    assert [box.x_min, box.y_min, box.x_max, box.y_max] == pytest.approx(_pixels(DETECT_BINS), abs=0.01)
    [model] = client.models().data
    assert model.masks is True and model.random_weights is False


def test_to_supervision_boxes_labels_and_masks_equal_pycocotools(client):
    import supervision as sv

    detected = client.detect(IMAGE, "red box").to_supervision()
    assert isinstance(detected, sv.Detections) and detected.mask is None
    assert list(detected.data["class_name"]) == ["red box", "box"]
    assert detected.xyxy[0] == pytest.approx(_pixels(DETECT_BINS), abs=0.01)
    assert list(detected.class_id) == [0, 1]

    segmented = client.segment(IMAGE, "red box")
    assert isinstance(segmented, SegmentResponse)
    detections = segmented.to_supervision()
    assert detections.xyxy[0] == pytest.approx(_pixels(SEGMENT_BINS), abs=0.01)
    assert detections.mask is not None and detections.mask.shape == (1, HEIGHT, WIDTH)
    assert detections.mask.dtype == bool
    rle = segmented.segments[0].mask
    assert rle is not None
    expected = coco_mask.decode({"size": rle.size, "counts": rle.counts.encode()}).astype(bool)
    assert expected.sum() == segmented.segments[0].mask_area > 0
    assert np.array_equal(detections.mask[0], expected)


def test_every_kind_of_image_input_sends_the_same_image(client, tmp_path):
    path = tmp_path / "box.png"
    path.write_bytes(IMAGE)
    expected = client.detect(IMAGE, "red box").detections
    with path.open("rb") as handle:
        inputs = [str(path), path, bytearray(IMAGE), handle, Image.open(io.BytesIO(IMAGE)),
                  Image.open(io.BytesIO(IMAGE)).convert("CMYK")]  # CMYK cannot be PNG: sent as RGB
        for image in inputs:
            assert client.detect(image, "red box").detections == expected


def test_the_async_client_gives_the_same_results_concurrently(trained_server, client):
    expected = [client.detect(IMAGE, "red box").detections, client.segment(IMAGE, "red box").segments]

    async def run() -> list:
        async with AsyncPaliGemmaClient(trained_server.url, api_key=trained_server.key) as aclient:
            detect, segment, caption = await asyncio.gather(
                aclient.detect(IMAGE, "red box"), aclient.segment(IMAGE, "red box"), aclient.caption(IMAGE))
            return [detect.detections, segment.segments, caption.text]

    detections, segments, caption = asyncio.run(run())
    assert [detections, segments] == expected
    assert caption == "a red box on white"


def test_errors_carry_the_servers_message_type_and_request_id(trained_server, client):
    with pytest.raises(BadRequestError) as raised:
        client.detect(b"GIF89a not really an image", "red box")
    error = raised.value
    assert (error.status_code, error.type, error.param) == (415, "unsupported_media_type", "image")
    assert "GIF" in error.message and error.request_id and len(error.request_id) == 32
    assert error.request_id in str(error) and error.message in str(error)

    with PaliGemmaClient(trained_server.url, api_key="wrong") as stranger, \
            pytest.raises(AuthenticationError) as raised_auth:
        stranger.caption(IMAGE)
    assert raised_auth.value.status_code == 401 and "Bearer" in raised_auth.value.message


# Each task with its arguments, as (method name, positional arguments after the image, keywords).
TASK_CALLS = [
    ("caption", (), {}),
    ("vqa", ("what is it?",), {"max_new_tokens": 6}),
    ("ocr", (), {"max_new_tokens": 6}),
    ("detect", ("red box",), {}),
    ("segment", (["red box"],), {}),
    ("generate", ("segment red box",), {}),
]


@pytest.fixture(scope="module")
def direct(trained_server):
    """A client whose responses are read as they come (the recording transport reads them whole)."""
    with PaliGemmaClient(trained_server.url, api_key=trained_server.key) as c:
        yield c


def _untimed(result) -> dict:
    return result.model_dump(mode="json", exclude={"timings"})


@pytest.mark.parametrize(("task", "args", "kwargs"), TASK_CALLS, ids=[call[0] for call in TASK_CALLS])
def test_streamed_deltas_make_the_raw_text_and_the_result_equals_the_unstreamed_one(direct, task, args, kwargs):
    plain = getattr(direct, task)(IMAGE, *args, **kwargs)
    with getattr(direct, f"{task}_stream")(IMAGE, *args, **kwargs) as stream:
        deltas = list(stream)
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == stream.text == plain.raw_text
    assert _untimed(stream.result) == _untimed(plain)
    assert stream.request_id and len(stream.request_id) == 32


def test_the_async_client_streams_concurrently(trained_server, direct):
    expected = [direct.caption(IMAGE), direct.segment(IMAGE, "red box")]

    async def run() -> list:
        async with AsyncPaliGemmaClient(trained_server.url, api_key=trained_server.key) as aclient:
            async def read(opened) -> tuple[str, object]:
                async with await opened as stream:
                    text = "".join([delta async for delta in stream])
                return text, stream.result

            return await asyncio.gather(read(aclient.caption_stream(IMAGE)),
                                        read(aclient.segment_stream(IMAGE, "red box")))

    for (text, result), plain in zip(asyncio.run(run()), expected, strict=True):
        assert text == plain.raw_text and _untimed(result) == _untimed(plain)


def test_a_stream_refused_before_it_begins_raises_the_servers_error(direct, trained_server):
    for open_stream in (lambda: direct.caption_stream(IMAGE, max_new_tokens=100_000),
                        lambda: asyncio.run(_async_caption_stream(trained_server, max_new_tokens=100_000))):
        with pytest.raises(BadRequestError) as raised:
            open_stream()
        error = raised.value
        assert (error.status_code, error.type, error.param) == (422, "validation_error", "max_new_tokens")
        assert "Given: 100000" in error.message and error.request_id and len(error.request_id) == 32


async def _async_caption_stream(trained_server, **options) -> None:
    async with AsyncPaliGemmaClient(trained_server.url, api_key=trained_server.key) as aclient:
        await aclient.caption_stream(IMAGE, **options)


def test_a_seed_makes_sampling_repeatable(direct):
    greedy = direct.caption(IMAGE, max_new_tokens=12)
    assert direct.caption(IMAGE, max_new_tokens=12, temperature=0).raw_text == greedy.raw_text
    sampled = {seed: direct.caption(IMAGE, max_new_tokens=12, temperature=2.0, seed=seed).raw_text
               for seed in range(6)}
    assert len(set(sampled.values())) > 1  # the options reach the model: other seeds, other samples
    again = direct.caption_stream(IMAGE, max_new_tokens=12, temperature=2.0, seed=3)
    assert again.get_result().raw_text == sampled[3]  # and the same seed, the same sample (streamed too)


GREEN = image_bytes(Image.new("RGB", (64, 64), (0, 255, 0)))  # tests/fault_launcher.py: slow decode steps


def test_an_error_inside_the_stream_raises_the_servers_error(tmp_path):
    """The one failure that comes after a stream began, provoked for real: the server is stopped while a
    slow generation streams, and its drain deadline passes before the generation ends."""
    env = {"FAULT_STEP_S": "0.05", "PALIGEMMA_DRAIN_TIMEOUT_S": "0.3"}
    with served(tmp_path, env=env, faults=True) as server, PaliGemmaClient(server.url) as client:
        stream = client.caption_stream(GREEN, max_new_tokens=250)
        deltas = []
        with pytest.raises(StreamError) as raised:
            for delta in stream:
                deltas.append(delta)
                if len(deltas) == 3:
                    server.process.send_signal(signal.SIGTERM)
        assert 3 <= len(deltas) < 100
        error = raised.value
        assert error.type == "shutting_down" and "shut down before this request finished" in error.message
        assert error.request_id == stream.request_id and error.request_id in str(error)
        assert server.process.wait(timeout=30) == 0
