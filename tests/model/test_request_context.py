"""Per-request context: the X-Request-ID, the access-log line, the request metrics (413s included)."""

from __future__ import annotations

import logging
import re

import pytest

from app.settings import Settings
from tests.helpers import files, metric_value, serve
from tests.images import jpeg

KEY = {"Authorization": "Bearer k1"}
MULTIPART = {"content-type": "multipart/form-data; boundary=zz", **KEY}


@pytest.fixture(scope="module")
def client():
    with serve(Settings(api_keys=("k1",), max_image_bytes=2048, max_request_bytes=4096,
                        default_max_new_tokens=2)) as c:
        yield c


@pytest.mark.parametrize("incoming", ["abc-123", "0af7651916cd43dd8448eb211c80319c", "req_01H:x.y/z+w=@1",
                                      "a" * 128])
def test_a_plausible_incoming_request_id_is_kept(client, incoming):
    response = client.post("/v1/vqa", headers={"X-Request-ID": incoming, **KEY}, files=files(jpeg(32, 32)))
    assert response.status_code == 422
    assert response.headers["x-request-id"] == incoming
    assert response.json()["error"]["request_id"] == incoming


@pytest.mark.parametrize("incoming", ["", "a" * 129, "two words", 'quo"te', "semi;colon", "caf\u00e9",
                                      "line\\nbreak"])
def test_an_implausible_request_id_is_replaced(client, incoming):
    response = client.get("/readyz", headers={"X-Request-ID": incoming.encode("utf-8")})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_without_one_each_request_gets_a_new_id(client):
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_one_access_log_line_per_request_with_status_duration_and_id(client, caplog):
    caplog.set_level(logging.INFO, logger="app.access")
    answered = client.post("/v1/caption", files=files(jpeg(32, 32)), headers={"X-Request-ID": "r-200", **KEY})
    refused = client.post("/v1/caption", files=files(jpeg(32, 32)), headers={"X-Request-ID": "r-401"})
    too_large = client.post("/v1/caption", content=b"x" * 10_000, headers={"X-Request-ID": "r-413", **MULTIPART})
    assert (answered.status_code, refused.status_code, too_large.status_code) == (200, 401, 413)
    records = [r for r in caplog.records if r.name == "app.access"]
    assert [r.request_id for r in records] == ["r-200", "r-401", "r-413"]  # type: ignore[attr-defined]
    for record, status in zip(records, (200, 401, 413), strict=True):
        assert (record.method, record.path, record.status) == ("POST", "/v1/caption", status)  # type: ignore[attr-defined]
        assert record.duration_ms >= 0  # type: ignore[attr-defined]
        assert re.fullmatch(rf'testclient:\d+ "POST /v1/caption HTTP/1.1" {status} \d+\.\d ms request_id=r-{status}',
                            record.getMessage())


def test_a_413_is_counted_under_its_endpoint(client):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    before = client.get("/metrics").text
    declared = client.post("/v1/caption", content=b"x" * 10_000, headers=MULTIPART)
    streamed = client.post("/v1/detect", content=chunks(), headers=MULTIPART)
    unknown = client.get("/v1/nothing", headers=KEY)
    assert (declared.status_code, streamed.status_code, unknown.status_code) == (413, 413, 404)
    after = client.get("/metrics").text

    def counted(**labels: str) -> float:
        return (metric_value(after, "paligemma_requests_total", **labels)
                - metric_value(before, "paligemma_requests_total", **labels))

    assert counted(endpoint="/v1/caption", status="413") == 1
    assert counted(endpoint="/v1/detect", status="413") == 1
    assert counted(endpoint="unmatched", status="404") == 1
    assert counted(endpoint="unmatched", status="413") == 0


def test_a_405_is_counted_under_its_endpoint(client):
    before = client.get("/metrics").text
    assert client.get("/v1/ocr", headers=KEY).status_code == 405
    after = client.get("/metrics").text
    assert (metric_value(after, "paligemma_requests_total", endpoint="/v1/ocr", status="405")
            - metric_value(before, "paligemma_requests_total", endpoint="/v1/ocr", status="405")) == 1


def test_process_and_runtime_metrics_are_exported(client):
    text = client.get("/metrics").text
    assert metric_value(text, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert metric_value(text, "process_cpu_seconds_total") > 0
    assert metric_value(text, "process_open_fds") > 0
    assert "python_info{" in text and "python_gc_collections_total{" in text
