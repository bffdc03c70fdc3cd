"""Results of requests generated together equal one-at-a-time results, through the real app and model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from app.settings import Settings
from tests.helpers import files, metric_value, serve
from tests.images import jpeg

REQUESTS = [
    ("/v1/caption", {"language": "en", "max_new_tokens": "12"}, (320, 240, 1)),
    ("/v1/caption", {"language": "fr", "long": "true", "max_new_tokens": "5"}, (640, 200, 2)),
    ("/v1/vqa", {"question": "how many dogs are there?", "max_new_tokens": "9"}, (100, 400, 3)),
    ("/v1/ocr", {"max_new_tokens": "16"}, (300, 300, 4)),
    ("/v1/detect", {"objects": "cat ; dog ; the red car", "max_new_tokens": "20"}, (500, 250, 5)),
    ("/v1/segment", {"objects": "person", "max_new_tokens": "24"}, (250, 500, 6)),
    ("/v1/generate", {"prompt": "answer es que es esto", "max_new_tokens": "7"}, (64, 64, 7)),
    ("/v1/caption", {"language": "en", "max_new_tokens": "12"}, (320, 240, 8)),
    ("/v1/vqa", {"question": "what colour is the sky?", "max_new_tokens": "15"}, (800, 600, 9)),
    ("/v1/detect", {"objects": "x", "max_new_tokens": "3"}, (333, 222, 10)),
    ("/v1/caption", {"language": "de", "max_new_tokens": "10"}, (320, 240, 1)),
    ("/v1/ocr", {"max_new_tokens": "30"}, (123, 456, 11)),
]


def _send(client, request):
    endpoint, data, (width, height, seed) = request
    response = client.post(endpoint, files=files(jpeg(width, height, seed)), data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["raw_text"], body["usage"]


def test_concurrent_mixed_requests_equal_the_same_requests_sent_alone():
    settings = Settings(max_batch_size=8, max_new_tokens=64)
    with serve(settings) as client:
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            batched = list(pool.map(lambda r: _send(client, r), REQUESTS * 2))
        metrics_after_burst = client.get("/metrics").text
        alone = [_send(client, r) for r in REQUESTS]

    assert batched == alone * 2
    # The comparison means something only if outputs differ between requests.
    assert len({text for text, _ in alone}) >= len(REQUESTS) // 2
    # Each request's own max_new_tokens held inside shared batches.
    for (_, data, _), (_, usage) in zip(REQUESTS, alone, strict=True):
        assert usage["completion_tokens"] <= int(data["max_new_tokens"])
    # Every request (and the warm-up's six) was prefilled once, and rows really shared decode steps.
    assert metric_value(metrics_after_burst, "paligemma_step_rows_sum", phase="prefill") == len(REQUESTS) * 2 + 6
    decode_steps = metric_value(metrics_after_burst, "paligemma_step_rows_count", phase="decode")
    single_row_steps = metric_value(metrics_after_burst, "paligemma_step_rows_bucket", phase="decode", le="1.0")
    assert single_row_steps < decode_steps, "no decode step ran more than one row"
