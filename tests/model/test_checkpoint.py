"""Serving a checkpoint from a local directory written with save_pretrained (the real loading path).

The checkpoint is the tiny preset trained to emit known detections and mask tokens, so these tests see
real boxes come out of a real forward pass and check the pixel maths end to end.
"""

from __future__ import annotations

import pytest

from app.model.loader import load_model
from app.model.presets import PRESETS
from app.model.sources import ModelUnavailable
from app.settings import Settings
from app.tasks.parsing import SEG_TOKENS_PER_MASK
from tests.helpers import files, serve
from tests.images import encode
from tests.trained_model import DETECT_BINS, SEGMENT_BINS, SEGMENT_CODES, image_bytes, training_image


@pytest.fixture(scope="module")
def client(trained_checkpoint):
    with serve(Settings(model=str(trained_checkpoint), max_new_tokens=64)) as c:
        yield c


def _expected_box(bins, width, height):
    y_min, x_min, y_max, x_max = bins
    return {"x_min": round(x_min / 1023 * width, 2), "y_min": round(y_min / 1023 * height, 2),
            "x_max": round(x_max / 1023 * width, 2), "y_max": round(y_max / 1023 * height, 2)}


def test_models_reports_the_directory_and_real_weights(client, trained_checkpoint):
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == str(trained_checkpoint)
    assert card["random_weights"] is False and card["warning"] is None
    assert card["image_tokens"] == 256 and card["image_size"] == 224


def test_detect_returns_boxes_in_pixels_of_the_uploaded_image(client):
    # The same picture at its training size and stretched to another aspect ratio: the model sees the
    # same 224x224 input, so the normalised box is the same and the pixel box follows the upload.
    for width, height in [(320, 200), (1000, 300)]:
        upload = training_image().resize((width, height))
        response = client.post("/v1/detect", files=files(image_bytes(upload), "a.png", "image/png"),
                               data={"objects": "red box"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["finish_reason"] == "stop"
        first, second = body["detections"]
        assert first["label"] == "red box" and second["label"] == "box"
        assert first["box"] == _expected_box(DETECT_BINS, width, height)
        assert first["box_normalized"]["x_min"] == pytest.approx(DETECT_BINS[1] / 1023)
        assert first["box_normalized"]["y_max"] == pytest.approx(DETECT_BINS[2] / 1023)


def test_segment_returns_box_and_mask_tokens_and_says_why_there_is_no_mask(client):
    upload = encode(training_image(), "JPEG", quality=95)
    response = client.post("/v1/segment", files=files(upload), data={"objects": "red box"})
    assert response.status_code == 200, response.text
    [segment] = response.json()["segments"]
    assert segment["label"] == "red box"
    assert segment["box"] == _expected_box(SEGMENT_BINS, 320, 200)
    assert segment["mask_tokens"] == list(SEGMENT_CODES)
    assert len(segment["mask_tokens"]) == SEG_TOKENS_PER_MASK
    assert segment["mask"] is None and "PALIGEMMA_MASK_DECODER" in segment["mask_error"]


def test_generate_splits_text_from_locations(client):
    response = client.post("/v1/generate", files=files(image_bytes(training_image()), "a.png", "image/png"),
                           data={"prompt": "detect red box"})
    body = response.json()
    assert body["text"] == "red box ; box"
    assert [d["label"] for d in body["detections"]] == ["red box", "box"]
    assert body["segments"] is None
    caption = client.post("/v1/caption", files=files(image_bytes(training_image()), "a.png", "image/png"))
    assert caption.json()["text"] == "a red box on white"


def test_a_paligemma_2_checkpoint_loads_through_from_pretrained_and_serves(tmp_path):
    """PaliGemma 2's Gemma 2 layers have no sdpa attention: loading must not ask for it (it would fail at
    load time), and the engine must serve what transformers picks instead."""
    import torch

    from app.model import presets

    preset = presets.PRESETS["tiny-gemma2"]
    processor = presets.build_processor(preset)
    torch.manual_seed(0)
    model = presets.build_model(preset, processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with serve(Settings(model=str(tmp_path), default_max_new_tokens=40)) as c:
        [card] = c.get("/v1/models").json()["data"]
        assert card["random_weights"] is False
        response = c.post("/v1/caption", files=files(encode(training_image())))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 40  # past the sliding window of 32


def test_load_model_raises_one_startup_error_for_a_missing_directory(tmp_path):
    with pytest.raises(ModelUnavailable) as raised:
        load_model(Settings(model=str(tmp_path / "missing"), device="cpu"))
    assert f"there is no directory at {tmp_path / 'missing'}" in str(raised.value)
    assert ", ".join(PRESETS) in str(raised.value)  # what PALIGEMMA_MODEL takes instead


def test_load_model_on_a_directory_without_a_checkpoint_says_what_it_must_hold(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ModelUnavailable) as raised:
        load_model(Settings(model=str(tmp_path), device="cpu"))
    message = str(raised.value)
    assert f"the directory {tmp_path} could not be loaded as a PaliGemma checkpoint" in message
    assert "config.json" in message and "(the loader said: " in message
