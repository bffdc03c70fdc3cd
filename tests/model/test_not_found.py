"""404 and 405 in the error envelope, with messages that name the endpoints and the allowed methods."""

from __future__ import annotations

import pytest

from app.api.routes import RouteTable
from app.schemas import ErrorResponse
from app.settings import Settings
from tests.helpers import serve

# Every endpoint the app serves, as a 404 must list them (the pages and the OpenAPI document included).
ENDPOINTS = ["POST /v1/caption", "POST /v1/vqa", "POST /v1/ocr", "POST /v1/detect", "POST /v1/segment",
             "POST /v1/generate", "POST /v1/chat/completions", "GET /v1/models", "POST /v1/adapters",
             "DELETE /v1/adapters/{name}", "GET /healthz", "GET /readyz", "GET /metrics", "GET /docs",
             "GET /openapi.json", "GET /", "GET /playground"]


KEY = {"Authorization": "Bearer k1"}


@pytest.fixture(scope="module")
def client():
    with serve(Settings(api_keys=("k1",)), ready=False) as c:
        yield c


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert ErrorResponse.model_validate(response.json())
    error = response.json()["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def test_404_lists_every_endpoint_from_the_routes(client):
    error = _error(client.get("/v1/nothing", headers=KEY), 404)
    assert error["type"] == "not_found"
    message = error["message"]
    assert message.startswith("no endpoint at GET /v1/nothing; the endpoints are: ")
    listed = message.split("the endpoints are: ")[1].split(", ")
    assert sorted(listed) == sorted(ENDPOINTS)
    assert listed[0].partition(" ")[2].startswith("/v1/")  # the API first
    assert not any(e.startswith("HEAD ") for e in listed)


def test_404_suggests_the_near_miss(client):
    message = _error(client.post("/v1/captions", headers=KEY), 404)["message"]
    assert "did you mean POST /v1/caption?" in message
    assert "did you mean" not in _error(client.get("/zzz"), 404)["message"]


def test_404_outside_the_keyed_paths_needs_no_key_and_inside_it_asks_for_one_first(client):
    assert _error(client.get("/nothing"), 404)["type"] == "not_found"
    assert _error(client.get("/v1/nothing"), 401)["type"] == "unauthorized"


def test_a_missing_static_file_is_a_plain_404(client):
    error = _error(client.get("/static/playground/nothing.js"), 404)
    assert error["message"] == "nothing at /static/playground/nothing.js"


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/v1/caption", "POST"),
    ("DELETE", "/healthz", "GET"),
    ("POST", "/v1/models", "GET"),
])
def test_405_names_the_methods_the_path_takes(client, method, path, allowed):
    response = client.request(method, path, headers=KEY)
    error = _error(response, 405)
    assert error["type"] == "method_not_allowed"
    assert error["message"] == f"{path} does not take {method}; it takes {allowed} (see /docs)"
    assert allowed in response.headers["allow"]


def test_the_route_table_matches_templates_and_prefers_the_method():
    class Route:
        def __init__(self, path, methods):
            self.path, self.methods = path, methods

    table = RouteTable([Route("/items/{id}", {"GET", "HEAD"}), Route("/items/{id}", {"POST"}),
                        Route("/v1/a", {"POST"}), Route("/static", None)])
    assert table.template("/items/7", "POST") == "/items/{id}"
    assert table.template("/items/7", "PUT") == "/items/{id}"
    assert table.template("/items", "GET") is None
    assert table.template("/static/x.js", "GET") is None
    assert table.listing() == ["POST /v1/a", "GET /items/{id}", "POST /items/{id}"]
