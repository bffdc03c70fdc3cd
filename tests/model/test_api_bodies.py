"""JSON bodies beside multipart, token streaming and sampling, through the real app and a real model."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.settings import Settings
from tests.helpers import files, serve
from tests.images import jpeg

IMAGE = jpeg(300, 200, seed=4)
B64 = base64.b64encode(IMAGE).decode()

# (endpoint, fields) for every task endpoint; `objects` as JSON takes a list.
CASES = [
    ("/v1/caption", {"language": "fr", "long": True}),
    ("/v1/vqa", {"question": "what is this?"}),
    ("/v1/ocr", {}),
    ("/v1/detect", {"objects": ["cat", "dog"]}),
    ("/v1/segment", {"objects": ["the cat"]}),
    ("/v1/generate", {"prompt": "caption es"}),
]


@pytest.fixture(scope="module")
def client():
    with serve(Settings(default_max_new_tokens=12)) as c:
        yield c


def _multipart(fields: dict) -> dict:
    data = {k: [str(x) for x in v] if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in fields.items()}
    return {"files": files(IMAGE), "data": data}


def _same(a: dict, b: dict) -> None:
    for body in (a, b):
        body.pop("timings")
    assert a == b


@pytest.mark.parametrize(("endpoint", "fields"), CASES, ids=[c[0] for c in CASES])
def test_json_and_multipart_give_the_same_answer(client, endpoint, fields):
    multipart = client.post(endpoint, **_multipart(fields))
    assert multipart.status_code == 200, multipart.text
    for image in (B64, "data:image/jpeg;base64," + B64, B64[:40] + "\n" + B64[40:]):
        response = client.post(endpoint, json={"image": image, **fields})
        assert response.status_code == 200, response.text
        _same(response.json(), multipart.json())
    # In multipart, a text `image` field is read like the JSON form instead of being refused.
    as_text = client.post(endpoint, data={"image": B64, **_multipart(fields)["data"]})
    assert as_text.status_code == 200, as_text.text
    _same(as_text.json(), client.post(endpoint, **_multipart(fields)).json())


def test_unknown_fields_are_refused_naming_the_accepted_ones(client):
    response = client.post("/v1/caption", json={"image": B64, "question": "why?"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "question"
    assert "language" in error["message"] and "max_new_tokens" in error["message"]


def test_text_fields_never_carry_location_tokens_and_raw_text_always_does(client):
    for endpoint, fields in CASES:
        body = client.post(endpoint, json={"image": B64, **fields}).json()
        text = body.get("text", body.get("answer"))
        if text is not None:
            assert "<loc" not in text and "<seg" not in text
        assert body["raw_text"]  # the output as generated


def test_a_prompt_written_like_the_hugging_face_examples_works(client):
    plain = client.post("/v1/generate", json={"image": B64, "prompt": "caption en"})
    prefixed = client.post("/v1/generate", json={"image": B64, "prompt": "<image><bos>caption en"})
    assert prefixed.status_code == 200, prefixed.text
    _same(prefixed.json(), plain.json())
    refused = client.post("/v1/generate", json={"image": B64, "prompt": "caption en <eos> ocr"})
    assert refused.status_code == 400 and "<eos>" in refused.json()["error"]["message"]


def _events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.parametrize(("endpoint", "fields"), CASES, ids=[c[0] for c in CASES])
def test_streaming_sends_deltas_then_the_whole_typed_result(client, endpoint, fields):
    plain = client.post(endpoint, json={"image": B64, **fields}).json()
    response = client.post(endpoint, json={"image": B64, "stream": True, **fields})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"delta"} and len(kinds) > 2
    assert "".join(data["text"] for kind, data in events if kind == "delta") == plain["raw_text"]
    _same(events[-1][1], plain)


def test_a_stream_refused_before_it_starts_keeps_its_status(client):
    response = client.post("/v1/caption", json={"image": B64, "stream": True, "max_new_tokens": 100_000})
    assert response.status_code == 422
    response = client.post("/v1/caption", json={"image": base64.b64encode(b"GIF89a" + bytes(50)).decode(),
                                                "stream": True})
    assert response.status_code == 415


def test_a_seed_makes_sampling_repeatable_alone_and_beside_others(client):
    def ask(seed: int, temperature: float = 1.0) -> str:
        response = client.post("/v1/caption", json={"image": B64, "temperature": temperature, "seed": seed,
                                                    "max_new_tokens": 16})
        assert response.status_code == 200, response.text
        return response.json()["raw_text"]

    alone = {seed: ask(seed) for seed in range(4)}
    assert len(set(alone.values())) > 1  # different seeds sample differently
    greedy = client.post("/v1/caption", json={"image": B64, "max_new_tokens": 16}).json()["raw_text"]
    with ThreadPoolExecutor(8) as pool:  # the same requests again, batched with each other and greedy ones
        seeds = list(range(4)) * 2
        together = list(pool.map(ask, seeds))
        greedy_together = list(pool.map(lambda _: ask(0, temperature=0.0), range(4)))
    assert together == [alone[seed] for seed in seeds]
    assert greedy_together == [greedy] * 4  # temperature 0 is greedy whatever the seed


class _OneImage(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = IMAGE if self.path == "/photo.jpg" else b"missing"
        self.send_response(200 if self.path == "/photo.jpg" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneImage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_image_urls_work_only_for_listed_hosts(client, image_host):
    url = f"http://{image_host}/photo.jpg"
    refused = client.post("/v1/caption", json={"image": url})  # off by default
    assert refused.status_code == 400 and "PALIGEMMA_IMAGE_URL_HOSTS" in refused.json()["error"]["message"]
    with serve(Settings(default_max_new_tokens=12, image_url_hosts=(image_host,))) as listed:
        by_url = listed.post("/v1/caption", json={"image": url})
        assert by_url.status_code == 200, by_url.text
        _same(by_url.json(), client.post("/v1/caption", json={"image": B64}).json())
        missing = listed.post("/v1/caption", json={"image": f"http://{image_host}/nope.jpg"})
        assert missing.status_code == 400 and "404" in missing.json()["error"]["message"]
