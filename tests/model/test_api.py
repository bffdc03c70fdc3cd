"""The API through the real app: a real tiny PaliGemma, the real engine, every endpoint and error."""

from __future__ import annotations

import pytest

import app
from app.api import render
from app.schemas import ErrorResponse
from app.settings import Settings
from tests.helpers import files, metric_value, serve
from tests.images import encode, jpeg, photo

TASKS = {
    "/v1/caption": {"language": "en"},
    "/v1/vqa": {"question": "what is this?"},
    "/v1/ocr": {},
    "/v1/detect": {"objects": "cat ; dog"},
    "/v1/segment": {"objects": "the cat"},
    "/v1/generate": {"prompt": "caption es"},
}


@pytest.fixture(scope="module")
def client():
    with serve(Settings(api_keys=(), max_new_tokens=32, default_max_new_tokens=8)) as c:
        yield c


@pytest.mark.parametrize("endpoint", list(TASKS))
def test_every_task_endpoint_answers_with_its_typed_result(client, endpoint):
    response = client.post(endpoint, files=files(jpeg(400, 300)), data=TASKS[endpoint])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny"
    assert body["image"] == {"width": 400, "height": 300}
    assert body["usage"]["prompt_tokens"] > 256  # the image tokens are in the prompt
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert "RANDOM weights" in body["warning"]
    assert body["finish_reason"] in ("stop", "length")
    key = {"/v1/vqa": "answer", "/v1/detect": "detections", "/v1/segment": "segments"}.get(endpoint, "text")
    assert key in body
    assert response.headers["x-request-id"]


def test_max_new_tokens_is_honoured(client):
    response = client.post("/v1/caption", files=files(jpeg()), data={"max_new_tokens": "3"})
    assert response.json()["usage"]["completion_tokens"] <= 3


def test_models_endpoint_describes_the_checkpoint(client):
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == "tiny"
    assert card["random_weights"] is True and "meaningless" in card["warning"]
    assert (card["image_size"], card["image_tokens"]) == (224, 256)
    assert card["dtype"] == "float32" and card["device"] == "cpu"
    assert card["masks"] is False and card["mask_decoder"] is None


def test_health_ready_docs_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert schema["info"]["version"] == app.__version__  # written once, in app/__init__.py
    for path in TASKS:
        operation = schema["paths"][path]["post"]
        for status in ("200", "400", "413", "415", "422", "429", "503", "504"):
            assert status in operation["responses"], (path, status)
    assert "ErrorResponse" in schema["components"]["schemas"]


def _error(response, status: int, error_type: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    if param is not None:
        assert error["param"] == param
    assert error["message"]
    return error


def test_field_errors(client):
    image = files(jpeg())
    _error(client.post("/v1/vqa", files=image, data={}), 422, "validation_error", "question")
    _error(client.post("/v1/vqa", files=image, data={"question": "  "}), 400, "invalid_request", "question")
    _error(client.post("/v1/caption", files=image, data={"language": "english"}), 400, "invalid_request",
           "language")
    _error(client.post("/v1/detect", files=image, data={}), 422, "validation_error", "objects")
    _error(client.post("/v1/detect", files=image, data={"objects": " ; "}), 400, "invalid_request", "objects")
    many = ";".join(f"o{i}" for i in range(17))
    _error(client.post("/v1/segment", files=image, data={"objects": many}), 400, "invalid_request", "objects")
    error = _error(client.post("/v1/caption", files=image, data={"max_new_tokens": "33"}), 422,
                   "validation_error", "max_new_tokens")
    assert "<= 32" in error["message"] and "Given: 33" in error["message"]
    _error(client.post("/v1/caption", files=image, data={"max_new_tokens": "0"}), 422, "validation_error")
    _error(client.post("/v1/caption", files=image, data={"long": "perhaps"}), 422, "validation_error", "long")


def test_image_errors(client):
    error = _error(client.post("/v1/caption", content=b"x", headers={"content-type": "text/plain"}), 415,
                   "unsupported_media_type")
    assert "multipart/form-data" in error["message"] and "application/json" in error["message"]
    _error(client.post("/v1/caption", files={"image": ("a.jpg", b"", "image/jpeg")}, data={"language": "en"}),
           400, "invalid_image", "image")
    _error(client.post("/v1/caption", files=files(b"")), 400, "invalid_image", "image")
    _error(client.post("/v1/caption", files=files(b"GIF89a" + b"\0" * 100)), 415, "unsupported_media_type")
    _error(client.post("/v1/caption", files=files(jpeg()[:300])), 400, "invalid_image")
    error = _error(client.post("/v1/caption", json={"image": "x"}), 400, "invalid_request", "image")
    assert "base64" in error["message"]
    error = _error(client.post("/v1/caption", json={"language": "en"}), 422, "validation_error", "image")
    assert "file field" in error["message"] and "base64" in error["message"]


def test_unknown_route_and_method(client):
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.get("/v1/caption"), 405, "method_not_allowed")


def test_too_many_pixels_and_too_many_bytes():
    with serve(Settings(max_image_pixels=10_000, max_image_bytes=60_000)) as c:
        error = _error(c.post("/v1/caption", files=files(jpeg(200, 100))), 413, "payload_too_large")
        assert "10000" in error["message"]
        big = encode(photo(900, 900, seed=3), "PNG")
        assert len(big) > 60_000 + 1024 * 1024 or len(big) > 60_000
        _error(c.post("/v1/caption", files=files(big, "a.png", "image/png")), 413, "payload_too_large")
        assert c.get("/readyz").status_code == 200


def test_the_declared_content_length_over_the_body_limit_is_refused_before_reading():
    with serve(Settings(max_image_bytes=2048, max_request_bytes=4096)) as c:
        response = c.post("/v1/caption", content=b"x" * 10_000,
                          headers={"content-type": "multipart/form-data; boundary=zz"})
        _error(response, 413, "payload_too_large")


def test_api_keys():
    with serve(Settings(api_keys=("k1", "k2"))) as c:
        error = _error(c.post("/v1/caption", files=files(jpeg())), 401, "unauthorized")
        assert "Bearer" in error["message"]
        response = c.post("/v1/caption", files=files(jpeg()), headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
        ok = c.post("/v1/caption", files=files(jpeg()), headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
    with serve(Settings(api_keys=("k1",), metrics_require_key=True)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_metrics_count_what_was_sent():
    with serve(Settings(default_max_new_tokens=4)) as c:
        warmed = c.get("/metrics").text  # the warm-up ran every task path once before ready

        def since_ready(text: str, name: str, **labels: str) -> float:
            return metric_value(text, name, **labels) - metric_value(warmed, name, **labels)

        for _ in range(3):
            assert c.post("/v1/caption", files=files(jpeg())).status_code == 200
        assert c.post("/v1/vqa", files=files(jpeg()), data={}).status_code == 422
        assert c.post("/v1/detect", files=files(jpeg()), data={"objects": "a"}).status_code == 200
        text = c.get("/metrics").text
    assert metric_value(text, "paligemma_requests_total", endpoint="/v1/caption", status="200") == 3
    assert metric_value(text, "paligemma_requests_total", endpoint="/v1/vqa", status="422") == 1
    assert metric_value(text, "paligemma_requests_total", endpoint="/v1/detect", status="200") == 1
    assert metric_value(text, "paligemma_request_duration_seconds_count", endpoint="/v1/caption") == 3
    # The four answered requests each got a row, one at a time.
    assert since_ready(text, "paligemma_queue_wait_seconds_count") == 4
    assert since_ready(text, "paligemma_time_to_first_token_seconds_count") == 4
    assert since_ready(text, "paligemma_step_rows_sum", phase="prefill") == 4
    assert since_ready(text, "paligemma_step_rows_bucket", phase="prefill", le="1.0") == 4
    assert since_ready(text, "paligemma_step_duration_seconds_count", phase="decode") >= 3
    assert 3 <= metric_value(text, "paligemma_generated_tokens_total", endpoint="/v1/caption") <= 12
    assert metric_value(text, "paligemma_running_requests") == 0
    assert metric_value(text, "paligemma_prompt_tokens_total", endpoint="/v1/caption") > 3 * 256
    assert metric_value(text, "paligemma_queue_depth") == 0
    assert metric_value(text, "paligemma_ready") == 1
    # The four successful requests sent the same picture: only the first one encoded it.
    assert since_ready(text, "paligemma_feature_cache_hits_total") == 3
    assert metric_value(text, "paligemma_model_info", model="tiny", dtype="float32", device="cpu",
                        random_weights="true", masks="false") == 1


def test_readyz_is_503_until_the_model_is_warmed_up(monkeypatch):
    import threading

    from app.serving import service as service_module

    gate = threading.Event()
    original = service_module.InferenceService.warm_up

    async def slow_warm_up(self):
        import asyncio

        await asyncio.to_thread(gate.wait, 30)
        await original(self)

    monkeypatch.setattr(service_module.InferenceService, "warm_up", slow_warm_up)
    with serve(ready=False) as c:
        assert c.get("/readyz").status_code == 503
        assert c.get("/readyz").json() == {"status": "starting"}
        _error(c.post("/v1/caption", files=files(jpeg())), 503, "not_ready")
        assert c.get("/healthz").status_code == 200
        gate.set()
        from tests.helpers import wait_ready

        wait_ready(c)
        assert c.post("/v1/caption", files=files(jpeg())).status_code == 200


def test_every_refusal_has_the_one_envelope_and_the_request_id():
    """401 (auth middleware), 413 (body-limit middleware, declared and streamed), 400 (form check and
    service errors), 422 (validation) and 404 (Starlette) all come from app.api.errors.error_response."""
    with serve(Settings(api_keys=("k1",), max_image_bytes=2048, max_request_bytes=4096)) as c:
        key = {"Authorization": "Bearer k1"}
        multipart = {"content-type": "multipart/form-data; boundary=zz", **key}

        def chunks():
            for _ in range(10):
                yield b"x" * 1000

        responses = {
            "401": c.post("/v1/caption", files=files(jpeg(32, 32))),
            "413 declared": c.post("/v1/caption", content=b"x" * 10_000, headers=multipart),
            "413 streamed": c.post("/v1/caption", content=chunks(), headers=multipart),
            "400 form": c.post("/v1/vqa", headers=key, files=files(jpeg(32, 32)), data={"question": "  "}),
            "400 bytes": c.post("/v1/vqa", headers=multipart, content=(
                b'--zz\r\nContent-Disposition: form-data; name="question"\r\n\r\n\xff\r\n--zz--\r\n')),
            "422": c.post("/v1/vqa", headers=key, files=files(jpeg(32, 32))),
            "404": c.get("/v1/nothing", headers=key),
        }
    for name, response in responses.items():
        assert response.status_code == int(name[:3]), (name, response.text)
        assert response.headers["content-type"] == "application/json", name
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "request_id"}, name
        assert body["error"]["request_id"] == response.headers["x-request-id"], name
        assert ErrorResponse.model_validate(body).model_dump() == body, name
    assert responses["401"].headers["www-authenticate"] == 'Bearer realm="paligemma"'
    assert responses["401"].json()["error"]["type"] == "unauthorized"
    for name in ("413 declared", "413 streamed"):
        assert responses[name].json()["error"]["type"] == "payload_too_large"
        assert responses[name].json()["error"]["param"] == "image"
        assert responses[name].headers["connection"] == "close"
    assert responses["400 bytes"].json()["error"]["param"] == "question"


def test_without_supervision_an_image_is_refused_before_any_model_work(monkeypatch):
    monkeypatch.setattr(render, "available", lambda: False)
    with serve() as client:
        response = client.post("/v1/detect", files=files(jpeg(64, 48)),
                               data={"objects": "red box"}, headers={"Accept": "image/png"})
        assert response.status_code == 501
        error = response.json()["error"]
        assert error["type"] == "not_implemented" and "paligemma-server[render]" in error["message"]
        assert error["param"] == "render"
        generated = [line for line in client.get("/metrics").text.splitlines()
                     if line.startswith("paligemma_generated_tokens_total{")]
        assert generated == []
        assert client.post("/v1/detect", files=files(jpeg(64, 48)),
                           data={"objects": "red box"}).status_code == 200
