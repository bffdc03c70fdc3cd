"""Strict multipart text fields (app.api.forms): what Starlette would decode as Latin-1 by fallback is
refused with a 400 naming the field; everything Starlette decodes correctly passes through unchanged."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import pytest
from fastapi import APIRouter, FastAPI, File, Form, UploadFile
from fastapi.testclient import TestClient

from app.api.errors import install_error_handlers
from app.api.forms import StrictFormRoute
from app.settings import Settings
from tests.helpers import metric_value, serve
from tests.images import jpeg

BOUNDARY = "b0undary"


def _body(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart body built by hand, so that it can carry bytes no client library would send."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def _echo_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter(route_class=StrictFormRoute)

    @router.post("/echo")
    async def echo(text: Annotated[str, Form()], upload: Annotated[UploadFile | None, File()] = None) -> dict:
        data = await upload.read() if upload is not None else b""
        return {"text": text, "upload_bytes": len(data)}

    app.include_router(router)
    return app


@pytest.fixture(scope="module")
def echo() -> TestClient:
    with TestClient(_echo_app(), raise_server_exceptions=False) as client:
        yield client


def _post(client: TestClient, body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}"):
    return client.post("/echo", content=body, headers={"content-type": content_type})


@pytest.mark.parametrize("text", ["plain", "é à ü", "日本語の質問", "emoji 🐈", "a\ufffdb (sent as U+FFFD itself)"])
def test_valid_utf8_text_passes_unchanged(echo: TestClient, text: str) -> None:
    response = _post(echo, _body([("text", None, text.encode())]))
    assert response.status_code == 200, response.text
    assert response.json()["text"] == text


@pytest.mark.parametrize("raw", [b"\xff\xfe\xfa", "café".encode("latin-1"), "é".encode()[:1], b"ok \xc3\x28"])
def test_bytes_that_are_not_utf8_are_refused_naming_the_field(echo: TestClient, raw: bytes) -> None:
    response = _post(echo, _body([("text", None, raw)]))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["param"] == "text"
    assert error["message"].startswith("`text` must be UTF-8 text")


def test_the_first_bad_field_is_named_and_files_are_not_text(echo: TestClient) -> None:
    image = jpeg(16, 16)  # binary, not UTF-8: fine in a file part
    ok = _post(echo, _body([("upload", "a.jpg", image), ("text", None, b"fine")]))
    assert ok.status_code == 200 and ok.json() == {"text": "fine", "upload_bytes": len(image)}
    bad = _post(echo, _body([("upload", "a.jpg", image), ("other", None, b"\xff"), ("text", None, b"\xfe")]))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "other"


def test_a_declared_charset_is_honoured_as_starlette_honours_it(echo: TestClient) -> None:
    latin1 = _post(echo, _body([("text", None, "café".encode("latin-1"))]),
                   f"multipart/form-data; boundary={BOUNDARY}; charset=latin-1")
    assert latin1.status_code == 200 and latin1.json()["text"] == "café"
    shift_jis = f"multipart/form-data; boundary={BOUNDARY}; charset=shift_jis"
    assert _post(echo, _body([("text", None, "日本".encode("shift_jis"))]), shift_jis).json()["text"] == "日本"
    bad = _post(echo, _body([("text", None, b"\x81")]), shift_jis)  # a lead byte with nothing after it
    assert bad.status_code == 400 and "shift_jis (the charset the request declares)" in bad.json()["error"]["message"]
    # An unknown charset: Starlette decodes as Latin-1, where every byte is text.
    unknown = _post(echo, _body([("text", None, b"caf\xe9")]), f"multipart/form-data; boundary={BOUNDARY}; charset=nope")
    assert unknown.status_code == 200 and unknown.json()["text"] == "café"


def test_other_bodies_are_left_to_starlette(echo: TestClient) -> None:
    urlencoded = echo.post("/echo", data={"text": "hi"})
    assert urlencoded.status_code == 200 and urlencoded.json()["text"] == "hi"
    malformed = _post(echo, b"--b0undary\r\nno headers here")  # Starlette's own refusal, unchanged
    assert malformed.status_code == 400
    assert malformed.json()["error"]["message"] == "Invalid multipart data."


def test_multibyte_characters_split_across_chunks() -> None:
    """The body arrives one byte per ASGI message: a character split between messages is still text."""
    app = _echo_app()

    def call(body: bytes) -> tuple[int, dict]:
        messages = [{"type": "http.request", "body": body[i:i + 1], "more_body": i + 1 < len(body)}
                    for i in range(len(body))]
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/echo", "raw_path": b"/echo", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        asyncio.run(app(scope, receive, send))
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))

    assert call(_body([("text", None, "日本語 é".encode())])) == (200, {"text": "日本語 é", "upload_bytes": 0})
    status, body = call(_body([("text", None, "é".encode() + b"\xe9")]))
    assert status == 400 and body["error"]["param"] == "text"


def test_the_task_endpoints_refuse_before_any_work() -> None:
    with serve(Settings(default_max_new_tokens=2)) as client:
        image = jpeg(32, 32)
        body = _body([("image", "a.jpg", image), ("question", None, "qu\xe9".encode("latin-1"))])
        response = client.post("/v1/vqa", content=body,
                               headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "question"
        assert metric_value(client.get("/metrics").text, "paligemma_prompt_tokens_total", endpoint="/v1/vqa") == 0
        # A U+FFFD that was sent as UTF-8 passes the transport and is refused by the prompt rules.
        response = client.post("/v1/vqa", files={"image": ("a.jpg", image, "image/jpeg")},
                               data={"question": "what is \ufffd?"})
        assert response.status_code == 400 and "U+FFFD" in response.json()["error"]["message"]
        ok = client.post("/v1/vqa", files={"image": ("a.jpg", image, "image/jpeg")}, data={"question": "qué?"})
        assert ok.status_code == 200, ok.text
