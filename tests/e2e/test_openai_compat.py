"""POST /v1/chat/completions through the official `openai` client and `curl -N`, against a served process
of the checkpoint trained in the tests (so detections and masks are known)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import httpx
import openai
import pytest

from tests.trained_model import DETECT_BINS, SEGMENT_CODES, image_bytes, training_image

DATA_URL = "data:image/png;base64," + base64.b64encode(image_bytes(training_image())).decode()


def _message(text: str, url: str = DATA_URL) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def client(trained_server):
    with openai.OpenAI(base_url=f"{trained_server.url}/v1", api_key=trained_server.key, max_retries=0) as c:
        yield c


def test_a_caption_as_a_chat_completion(client):
    completion = client.chat.completions.create(model="paligemma", messages=_message("caption en"), max_tokens=32)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "a red box on white"
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens > 256 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_detect_and_segment_prefixes_carry_typed_results(client):
    completion = client.chat.completions.create(model="paligemma", messages=_message("detect red box"),
                                                max_completion_tokens=64)
    detections = completion.model_extra["detections"]
    assert [d["label"] for d in detections] == ["red box", "box"]
    y1, x1, y2, x2 = DETECT_BINS
    assert detections[0]["box_normalized"] == pytest.approx(
        {"x_min": x1 / 1023, "y_min": y1 / 1023, "x_max": x2 / 1023, "y_max": y2 / 1023})
    segmented = client.chat.completions.create(model="paligemma", messages=_message("segment red box"),
                                               max_tokens=64)
    [segment] = segmented.model_extra["segments"]
    assert segment["mask_tokens"] == list(SEGMENT_CODES) and segment["mask"]["counts"]


def test_streaming_with_the_openai_client(client):
    whole = client.chat.completions.create(model="paligemma", messages=_message("detect red box"), max_tokens=64)
    chunks = list(client.chat.completions.create(model="paligemma", messages=_message("detect red box"),
                                                 max_tokens=64, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "stop"
    assert final.model_extra["detections"] == whole.model_extra["detections"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_with_a_seed_repeats(client):
    def ask() -> str:
        return client.chat.completions.create(model="paligemma", messages=_message("caption en"), max_tokens=12,
                                              temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
    assert ask() == ask()


@pytest.mark.parametrize(("extra", "messages", "phrase"), [
    ({"n": 2}, None, "n must be 1"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, None, "tools"),
    ({"stop": ["."]}, None, "stop strings"),
    ({}, [{"role": "system", "content": "be nice"}, *_message("caption en")], "one user message"),
    ({}, [{"role": "user", "content": [*_message("caption en")[0]["content"],
                                       {"type": "image_url", "image_url": {"url": DATA_URL}}]}], "one image"),
    ({}, [{"role": "user", "content": "caption en"}], "one image"),
    ({}, _message("caption en", url="https://example.com/cat.jpg"), "PALIGEMMA_IMAGE_URL_HOSTS"),
])
def test_what_cannot_be_honoured_is_a_400_that_says_so(client, extra, messages, phrase):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="paligemma", messages=messages or _message("caption en"),
                                       extra_body=extra)
    assert phrase in refused.value.body["message"], refused.value.body


def _post(server, **fields) -> httpx.Response:
    """The body as JSON, exactly as given (the openai package drops or reshapes some values)."""
    return httpx.post(f"{server.url}/v1/chat/completions", json={"model": "paligemma", **fields},
                      headers={"Authorization": f"Bearer {server.key}"}, timeout=60)


def test_null_means_unset_and_empty_stop_means_none(trained_server):
    # The API's types allow null for these (the default applies), and an empty list of stop strings.
    response = _post(trained_server, messages=_message("caption en"), temperature=None, top_p=None, n=None,
                     stream=None, stream_options=None, max_tokens=None, max_completion_tokens=None, seed=None,
                     stop=[], logprobs=None, presence_penalty=None, frequency_penalty=None, user=None)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "a red box on white"
    for stop in (None, "", []):
        assert _post(trained_server, messages=_message("caption en"), stop=stop).status_code == 200, stop


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_over_the_cap_is_refused_naming_the_field_that_was_sent(trained_server, field):
    response = _post(trained_server, messages=_message("caption en"), **{field: 100_000})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert error["message"].startswith(f"`{field}` must be <= 256 (PALIGEMMA_MAX_NEW_TOKENS). Given: 100000")
    assert "max_new_tokens" not in error["message"]  # a field this API does not have


def test_curl_streams_the_chunks_then_done(trained_server, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (Debian package `curl`)")
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"model": "paligemma", "messages": _message("caption en"), "stream": True}))
    out = subprocess.run([curl, "-sS", "-N", f"{trained_server.url}/v1/chat/completions",
                          "-H", f"Authorization: Bearer {trained_server.key}",
                          "-H", "Content-Type: application/json", "--data-binary", f"@{body}"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "a red box on white"
    assert httpx.get(f"{trained_server.url}/readyz").status_code == 200
