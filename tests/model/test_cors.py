"""CORS, off unless PALIGEMMA_CORS_ORIGINS is set: preflights work with API keys, refusals are readable."""

from __future__ import annotations

import pytest

from app.settings import Settings, SettingsError, load_settings
from tests.helpers import files, metric_value, serve
from tests.images import jpeg

ORIGIN = "https://app.example.com"


def _preflight(client, path: str = "/v1/caption", origin: str = ORIGIN, headers: str = "authorization"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": headers})


@pytest.fixture(scope="module")
def client():
    settings = Settings(cors_origins=(ORIGIN, "http://localhost:3000"), api_keys=("k1",), max_image_bytes=2048,
                        max_request_bytes=4096, default_max_new_tokens=2)
    with serve(settings) as c:
        yield c


@pytest.mark.parametrize("headers", ["authorization", "x-api-key,content-type", "x-request-id,traceparent"])
def test_a_preflight_is_answered_without_a_key(client, headers):
    response = _preflight(client, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in headers.split(","))
    assert response.headers["x-request-id"]


def test_a_preflight_from_another_origin_is_refused(client):
    response = _preflight(client, origin="https://evil.example.net")
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


def test_answers_and_refusals_carry_the_headers_a_page_needs_to_read_them(client):
    origin = {"Origin": "http://localhost:3000"}
    ok = client.post("/v1/caption", files=files(jpeg(32, 32)), headers={**origin, "X-API-Key": "k1"})
    refused = client.post("/v1/caption", files=files(jpeg(32, 32)), headers=origin)
    too_large = client.post("/v1/caption", content=b"x" * 10_000, headers={
        **origin, "X-API-Key": "k1", "content-type": "multipart/form-data; boundary=zz"})
    for response, status in ((ok, 200), (refused, 401), (too_large, 413)):
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
        exposed = response.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed and "retry-after" in exposed


def test_preflights_are_not_counted_as_api_requests(client):
    before = client.get("/metrics").text
    assert _preflight(client).status_code == 200
    after = client.get("/metrics").text
    assert after.count("paligemma_requests_total{") == before.count("paligemma_requests_total{")
    for status in ("200", "401", "405"):
        assert (metric_value(after, "paligemma_requests_total", endpoint="/v1/caption", status=status)
                == metric_value(before, "paligemma_requests_total", endpoint="/v1/caption", status=status))


def test_off_by_default():
    with serve(Settings(api_keys=("k1",)), ready=False) as c:
        response = c.get("/healthz", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in response.headers
        assert _preflight(c).status_code == 401  # no CORS layer: the key check answers


def test_any_origin():
    with serve(Settings(cors_origins=("*",)), ready=False) as c:
        assert _preflight(c, origin="https://anywhere.example").headers["access-control-allow-origin"] == "*"


def test_the_setting_is_a_comma_separated_list_of_origins(monkeypatch):
    monkeypatch.setenv("PALIGEMMA_CORS_ORIGINS", " https://a.example.com/ , http://localhost:8080,http://[::1]:3000")
    assert load_settings().cors_origins == ("https://a.example.com", "http://localhost:8080", "http://[::1]:3000")
    for bad in ("https://a.example.com/app", "a.example.com", "ftp://a.example.com", "https://a b"):
        monkeypatch.setenv("PALIGEMMA_CORS_ORIGINS", bad)
        with pytest.raises(SettingsError, match=r"PALIGEMMA_CORS_ORIGINS: .* is not an origin"):
            load_settings()
