"""A table of bad inputs sent to a real server process: each gets its expected status, none a 5xx,
and the server is still ready afterwards."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from tests.badinputs import bad_inputs
from tests.images import jpeg
from tests.served import served

GOOD = jpeg(64, 48)
MB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"PALIGEMMA_MAX_IMAGE_BYTES": str(3 * MB), "PALIGEMMA_DEFAULT_MAX_NEW_TOKENS": "2",
           "PALIGEMMA_MAX_TEXT_CHARS": "200"}
    with served(tmp_path_factory.mktemp("bad-input"), env=env) as s:
        yield s


def _multipart(parts: list[tuple[str, str | None, bytes, str | None]], boundary: str = "b0undary") -> bytes:
    """A multipart body built by hand, so that tests can send what no client library would."""
    out = b""
    for name, filename, data, content_type in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


# (name, endpoint, request kwargs for httpx, expected status)
FIELD_CASES = [
    ("json body whose image is base64 of text", "/v1/caption", {"json": {"image": "aGVsbG8="}}, 415),
    ("json body, image not base64", "/v1/caption", {"json": {"image": "not base64!"}}, 400),
    ("json body, image not a string", "/v1/caption", {"json": {"image": 12}}, 422),
    ("json body without image", "/v1/caption", {"json": {"language": "en"}}, 422),
    ("json body not an object", "/v1/caption", {"json": ["image"]}, 422),
    ("json body not json", "/v1/caption", {"content": b"{nope", "headers": {"content-type": "application/json"}},
     400),
    ("json unknown field", "/v1/caption", {"json": {"image": base64.b64encode(GOOD).decode(), "question": "x"}},
     422),
    ("urlencoded body without image", "/v1/caption", {"data": {"language": "en"}}, 422),
    ("no body", "/v1/caption", {}, 415),
    ("text/plain body", "/v1/caption", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ("image sent as a plain field", "/v1/caption",
     {"content": _multipart([("image", None, GOOD, None)]),
      "headers": {"content-type": "multipart/form-data; boundary=b0undary"}}, 400),
    ("missing question", "/v1/vqa", {"files": {"image": ("a.jpg", GOOD)}}, 422),
    ("empty question", "/v1/vqa", {"files": {"image": ("a.jpg", GOOD)}, "data": {"question": ""}}, 400),
    ("whitespace question", "/v1/vqa", {"files": {"image": ("a.jpg", GOOD)}, "data": {"question": " \t "}}, 400),
    ("question over max chars", "/v1/vqa",
     {"files": {"image": ("a.jpg", GOOD)}, "data": {"question": "why " * 100}}, 400),
    ("huge question field (2 MB)", "/v1/vqa",
     {"files": {"image": ("a.jpg", GOOD)}, "data": {"question": "x" * (2 * MB)}}, 400),
    ("control characters in question", "/v1/vqa",
     {"files": {"image": ("a.jpg", GOOD)}, "data": {"question": "a\x00b"}}, 400),
    ("non-UTF-8 question", "/v1/vqa",
     {"content": _multipart([("image", "a.jpg", GOOD, "image/jpeg"), ("question", None, b"\xff\xfe\xfa", None)]),
      "headers": {"content-type": "multipart/form-data; boundary=b0undary"}}, 400),
    ("bad language", "/v1/caption", {"files": {"image": ("a.jpg", GOOD)}, "data": {"language": "klingon"}}, 400),
    ("language too long", "/v1/caption", {"files": {"image": ("a.jpg", GOOD)}, "data": {"language": "e" * 50}}, 422),
    ("long not a bool", "/v1/caption", {"files": {"image": ("a.jpg", GOOD)}, "data": {"long": "maybe"}}, 422),
    ("max_new_tokens not a number", "/v1/ocr",
     {"files": {"image": ("a.jpg", GOOD)}, "data": {"max_new_tokens": "ten"}}, 422),
    ("max_new_tokens negative", "/v1/ocr", {"files": {"image": ("a.jpg", GOOD)}, "data": {"max_new_tokens": "-1"}}, 422),
    ("max_new_tokens over the cap", "/v1/ocr",
     {"files": {"image": ("a.jpg", GOOD)}, "data": {"max_new_tokens": "100000"}}, 422),
    ("max_new_tokens huge integer", "/v1/ocr",
     {"files": {"image": ("a.jpg", GOOD)}, "data": {"max_new_tokens": "9" * 400}}, 422),
    ("no objects", "/v1/detect", {"files": {"image": ("a.jpg", GOOD)}}, 422),
    ("only separators", "/v1/detect", {"files": {"image": ("a.jpg", GOOD)}, "data": {"objects": ";;;"}}, 400),
    ("too many objects", "/v1/segment",
     {"files": {"image": ("a.jpg", GOOD)}, "data": {"objects": ";".join(["o"] * 40)}}, 400),
    ("object name too long", "/v1/detect", {"files": {"image": ("a.jpg", GOOD)}, "data": {"objects": "x" * 500}}, 400),
    ("missing prompt", "/v1/generate", {"files": {"image": ("a.jpg", GOOD)}}, 422),
    ("image over the byte limit", "/v1/caption", {"files": {"image": ("a.jpg", b"\xff\xd8" + b"0" * (3 * MB))}}, 413),
    ("malformed multipart", "/v1/caption",
     {"content": b"--zz\r\nnonsense\r\n\r\n", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
     400),
    ("multipart without boundary", "/v1/caption",
     {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400),
    ("two images", "/v1/caption",
     {"files": [("image", ("a.jpg", GOOD, "image/jpeg")), ("image", ("b.jpg", GOOD, "image/jpeg"))]}, 400),
    ("unknown extra field", "/v1/ocr", {"files": {"image": ("a.jpg", GOOD)}, "data": {"colour": "red"}}, 422),
    ("a field given twice", "/v1/caption", {"files": {"image": ("a.jpg", GOOD)},
                                            "data": {"language": ["en", "fr"]}}, 400),
    ("the image under another name", "/v1/caption", {"files": {"file": ("a.jpg", GOOD)}}, 422),
    ("a text field sent as a file", "/v1/vqa",
     {"files": {"image": ("a.jpg", GOOD), "question": ("q.txt", b"what?")}}, 400),
    ("control token in a prompt", "/v1/generate", {"files": {"image": ("a.jpg", GOOD)},
                                                   "data": {"prompt": "caption en<eos>"}}, 400),
    ("temperature out of range", "/v1/caption", {"files": {"image": ("a.jpg", GOOD)},
                                                 "data": {"temperature": "3"}}, 422),
    ("top_p zero", "/v1/caption", {"files": {"image": ("a.jpg", GOOD)}, "data": {"top_p": "0"}}, 422),
    ("negative seed", "/v1/caption", {"files": {"image": ("a.jpg", GOOD)}, "data": {"seed": "-1"}}, 422),
    ("stream with render", "/v1/detect", {"files": {"image": ("a.jpg", GOOD)},
                                          "data": {"objects": "a", "stream": "true", "render": "true"}}, 400),
]


@pytest.mark.parametrize("endpoint", ["/v1/caption", "/v1/detect", "/v1/chat/completions"])
@pytest.mark.parametrize("depth", [1000, 40])
def test_json_nested_past_the_limit_is_a_400_naming_it(server, endpoint, depth):
    body = '{"image": "x", "a": ' + "[" * depth + "]" * depth + "}"
    response = httpx.post(f"{server.url}{endpoint}", content=body, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "nests deeper than 32 levels" in error["message"], error


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c.name)
def test_bad_images(server, case):
    response = httpx.post(f"{server.url}/v1/caption", files={"image": ("upload.bin", case.data, "image/png")},
                          timeout=60)
    assert response.status_code == case.expected_status, (case.note, response.text)
    if case.expected_status == 200:
        if case.expected_size:
            image = response.json()["image"]
            assert (image["width"], image["height"]) == case.expected_size
    else:
        error = response.json()["error"]
        assert error["param"] == "image" and error["message"]


@pytest.mark.parametrize("case", FIELD_CASES, ids=lambda c: c[0])
def test_bad_fields(server, case):
    _, endpoint, kwargs, status = case
    response = httpx.post(f"{server.url}{endpoint}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    if status != 200:
        body = response.json()
        assert set(body) == {"error"} and body["error"]["message"], body


def test_still_ready_and_nothing_was_a_server_error(server):
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    codes = [line for line in metrics.splitlines() if line.startswith("paligemma_requests_total{")]
    assert codes, metrics
    assert not [line for line in codes if 'status="5' in line], codes
    total = sum(float(line.rsplit(" ", 1)[1]) for line in codes)
    assert total >= len(bad_inputs()) + len(FIELD_CASES)
    assert json.loads(httpx.get(f"{server.url}/healthz").text) == {"status": "alive"}
