"""Annotated PNGs from /v1/detect and /v1/segment (`Accept: image/png` or `render=true`)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from app.api.annotate import prefers_png
from app.masks.placement import decode_rle
from tests.helpers import files
from tests.trained_model import image_bytes, training_image

WIDTH, HEIGHT = 640, 400
IMAGE = image_bytes(training_image().resize((WIDTH, HEIGHT)))
ORIGINAL = np.asarray(training_image().resize((WIDTH, HEIGHT)).convert("RGB"), dtype=int)


@pytest.mark.parametrize(("accept", "png"), [
    ("image/png", True),
    ("image/*", True),
    ("image/png, application/json;q=0.5", True),
    ("", False),
    ("*/*", False),
    ("application/json", False),
    ("image/png, application/json", False),  # a tie: JSON
    ("image/png;q=0.4, */*;q=0.5", False),
    ("image/png;q=0", False),
    ("image/png;q=bogus", False),
    ("IMAGE/PNG", True),
])
def test_accept_header_ranking(accept, png):
    assert prefers_png(accept) is png


def _post(server, path: str, accept: str | None = None, **data: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.key}"}
    if accept:
        headers["Accept"] = accept
    return httpx.post(f"{server.url}{path}", files=files(IMAGE, "box.png", "image/png"),
                      data={"objects": "red box", **data}, headers=headers, timeout=60)


def _changed(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
        pixels = np.asarray(image.convert("RGB"), dtype=int)
    return np.abs(pixels - ORIGINAL).sum(axis=2) > 0


def _edges(box: dict) -> np.ndarray:
    x1, y1, x2, y2 = (round(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
    edges = np.zeros((HEIGHT, WIDTH), bool)
    edges[y1:y2, [x1, x2 - 1]] = True
    edges[[y1, y2 - 1], x1:x2] = True
    return edges


def test_detect_answers_an_annotated_png_with_its_boxes(trained_server):
    boxes = [d["box"] for d in _post(trained_server, "/v1/detect").json()["detections"]]
    assert len(boxes) == 2
    for response in (_post(trained_server, "/v1/detect", accept="image/png"),
                     _post(trained_server, "/v1/detect", render="true")):
        changed = _changed(response)
        for box in boxes:
            assert changed[_edges(box)].mean() > 0.9
        _, y1, x2, y2 = (round(boxes[0][k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        assert not changed[y1 + 10:y2 - 10, 260:x2 - 10].any()  # outlines only, no fill
        assert not changed[HEIGHT - 60:, :].any()  # nothing far from every box


def test_segment_answers_an_annotated_png_with_its_mask(trained_server):
    [segment] = _post(trained_server, "/v1/segment").json()["segments"]
    mask = decode_rle(segment["mask"])
    assert mask.sum() > 0
    changed = _changed(_post(trained_server, "/v1/segment", accept="image/png"))
    assert changed[mask].mean() > 0.99
    assert changed[_edges(segment["box"])].mean() > 0.9


def test_json_stays_the_default(trained_server):
    for accept in (None, "*/*", "application/json", "image/png, application/json"):
        response = _post(trained_server, "/v1/detect", accept=accept)
        assert response.headers["content-type"] == "application/json"


def test_the_openapi_document_declares_the_png(trained_server):
    document = httpx.get(f"{trained_server.url}/openapi.json").json()
    for path in ("/v1/detect", "/v1/segment"):
        operation = document["paths"][path]["post"]
        # Streamed answers too (stream=true): schemathesis fails an answer whose type is not declared.
        assert {"application/json", "image/png", "text/event-stream"} <= set(operation["responses"]["200"]["content"])
        assert "501" in operation["responses"]
        for form in ("multipart/form-data", "application/json"):
            assert "render" in operation["requestBody"]["content"][form]["schema"]["properties"]
