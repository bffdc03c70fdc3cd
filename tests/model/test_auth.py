"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, refusals that say how to send one."""

from __future__ import annotations

import pytest

from app.api.auth import key_is_valid, presented_credentials, refusal_message
from app.settings import Settings
from tests.helpers import files, serve
from tests.images import jpeg


@pytest.fixture(scope="module")
def client():
    with serve(Settings(api_keys=("k1", "k2"), default_max_new_tokens=2)) as c:
        yield c


def _caption(client, **headers: str):
    return client.post("/v1/caption", files=files(jpeg(32, 32)), headers=headers)


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer k1"},
    {"Authorization": "bearer   k2 "},
    {"X-API-Key": "k2"},
    {"x-api-key": "k1"},
    # A proxy's own Authorization header does not hide a valid X-API-Key.
    {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": "k1"},
])
def test_a_valid_key_in_either_header_is_accepted(client, headers):
    assert _caption(client, **headers).status_code == 200


@pytest.mark.parametrize(("headers", "says"), [
    ({}, "API key missing"),
    ({"Authorization": "k1"}, "has no `Bearer` scheme"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "scheme is 'Basic', not Bearer"),
    ({"Authorization": "Bearer "}, "Bearer token is empty"),
    ({"X-API-Key": " "}, "X-API-Key header is empty"),
    ({"Authorization": "Bearer k3"}, "API key not valid"),
    ({"X-API-Key": "k1 k2"}, "API key not valid"),
])
def test_refusals_say_what_was_wrong_and_how_to_send_a_key(client, headers, says):
    response = _caption(client, **headers)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "unauthorized"
    assert says in error["message"]
    assert "`Authorization: Bearer <key>`" in error["message"] and "`X-API-Key: <key>`" in error["message"]
    assert response.headers["www-authenticate"] == 'Bearer realm="paligemma"'


def test_a_bare_key_in_authorization_is_not_reported_as_missing(client):
    message = _caption(client, Authorization="k1").json()["error"]["message"]
    assert "missing" not in message.lower()


def test_openapi_declares_both_schemes_as_alternatives(client):
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"].lower() == "bearer"
    assert schemes["APIKeyHeader"] == {**schemes["APIKeyHeader"], "type": "apiKey", "in": "header",
                                       "name": "X-API-Key"}
    # Two requirement objects: either one satisfies it (one object holding both would need both).
    for path in ("/v1/caption", "/v1/models"):
        operation = next(iter(schema["paths"][path].values()))
        assert sorted(map(tuple, operation["security"])) == [("APIKeyHeader",), ("HTTPBearer",)], path
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_without_keys_nothing_is_declared_or_asked():
    with serve(Settings(default_max_new_tokens=2)) as c:
        assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})
        assert _caption(c).status_code == 200


def test_every_presented_key_is_compared_with_every_configured_one():
    assert key_is_valid(("nope", "k2"), ("k1", "k2"))
    assert not key_is_valid(("nope",), ("k1", "k2"))
    assert not key_is_valid((), ("k1",))
    assert not key_is_valid(("k1x",), ("k1",)) and not key_is_valid(("k",), ("k1",))


def test_credentials_are_read_from_both_headers():
    assert presented_credentials("Bearer a", "b").keys == ("a", "b")
    assert presented_credentials(None, None).keys == ()
    bare = presented_credentials("a", None)
    assert bare.keys == () and bare.problem is not None
    assert refusal_message(bare).startswith("the Authorization header has no `Bearer` scheme")
