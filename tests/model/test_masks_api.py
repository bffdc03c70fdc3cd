"""/v1/segment with a mask decoder loaded: real masks from a real forward pass, placed in the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.masks.decoder import PUBLISHED_SHA256, MaskDecoder
from app.masks.placement import decode_rle, pixel_box, place_mask
from app.settings import Settings
from tests.helpers import files, metric_value, random_mask_decoder, serve
from tests.trained_model import SEGMENT_BINS, SEGMENT_CODES, image_bytes, training_image


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory) -> Path:
    return random_mask_decoder(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def client(trained_checkpoint, decoder_file):
    with serve(Settings(model=str(trained_checkpoint), mask_decoder=decoder_file)) as c:
        yield c


def test_models_says_masks_are_on_and_which_file(client, decoder_file):
    [card] = client.get("/v1/models").json()["data"]
    assert card["masks"] is True
    info = card["mask_decoder"]
    assert info["path"] == str(decoder_file)
    assert info["matches_published"] is False and info["sha256"] != PUBLISHED_SHA256
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "paligemma_model_info", model=card["id"], dtype="float32", device="cpu",
                        random_weights="false", masks="true") == 1


@pytest.mark.parametrize("size", [(320, 200), (200, 640)])
def test_segment_returns_a_mask_inside_its_box(client, decoder_file, size):
    width, height = size
    upload = image_bytes(training_image().resize(size))
    response = client.post("/v1/segment", files=files(upload, "a.png", "image/png"),
                           data={"objects": "red box"})
    assert response.status_code == 200, response.text
    [segment] = response.json()["segments"]
    assert segment["mask_error"] is None
    rle = segment["mask"]
    assert rle["size"] == [height, width]
    mask = decode_rle(rle)
    assert mask.shape == (height, width)
    assert segment["mask_area"] == int(mask.sum()) > 0

    # Every mask pixel lies inside the object's box (big_vision's integer pixel box).
    y1, x1, y2, x2 = SEGMENT_BINS
    box = (x1 / 1023, y1 / 1023, x2 / 1023, y2 / 1023)
    px1, py1, px2, py2 = pixel_box(box, width, height)
    ys, xs = np.nonzero(mask)
    assert xs.min() >= px1 and xs.max() < px2 and ys.min() >= py1 and ys.max() < py2
    mask_box = segment["mask_box"]
    assert mask_box["x_min"] >= segment["box"]["x_min"] - 1 and mask_box["x_max"] <= segment["box"]["x_max"] + 1
    assert mask_box["y_min"] >= segment["box"]["y_min"] - 1 and mask_box["y_max"] <= segment["box"]["y_max"] + 1

    # And it is exactly the decoder's map for the emitted tokens, placed the big_vision way.
    decoder = MaskDecoder.from_npz(decoder_file)
    logits = decoder.decode(np.array([SEGMENT_CODES]))[0]
    assert np.array_equal(mask, place_mask(logits, box, width, height))
