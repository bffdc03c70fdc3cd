"""The shipped demo checkpoint, served as any checkpoint is (`PALIGEMMA_MODEL=demo`): it says what it is,
its masks are on without PALIGEMMA_MASK_DECODER, and it answers a shipped scene with the right boxes and
masks."""

from __future__ import annotations

import pytest

from app.demo import ABOUT, MASK_DECODER_FILE, WEIGHTS_DIR
from app.demo.answers import left_to_right
from app.demo.evaluate import scene_box
from app.demo.scenes import SHIPPED, STATIC_SCENES
from app.demo.scoring import box_iou, mask_iou
from app.demo.world import object_mask
from app.masks.placement import decode_rle
from app.settings import Settings
from tests.helpers import files, metric_value, serve

SCENE = SHIPPED[0]  # three objects


@pytest.fixture(scope="module")
def client():
    with serve(Settings(model="demo")) as c:
        yield c


def _upload():
    return files((STATIC_SCENES / SCENE.file_name).read_bytes(), SCENE.file_name, "image/png")


def test_models_says_what_the_demo_is_and_that_masks_are_on(client):
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == "demo" and card["about"] == ABOUT
    assert card["random_weights"] is False and card["warning"] is None
    assert card["masks"] is True
    assert card["mask_decoder"]["path"] == str(WEIGHTS_DIR / MASK_DECODER_FILE)
    assert card["mask_decoder"]["matches_published"] is False
    assert metric_value(client.get("/metrics").text, "paligemma_model_info", model="demo", dtype="float32",
                        device="cpu", random_weights="false", masks="true") == 1


def test_detect_finds_every_object_of_a_shipped_scene(client):
    scene = SCENE.scene()
    for obj in left_to_right(scene.objects):
        response = client.post("/v1/detect", files=_upload(), data={"objects": obj.name})
        assert response.status_code == 200, response.text
        body = response.json()
        assert "warning" not in body or body["warning"] is None
        [found] = body["detections"]
        assert found["label"] == obj.name
        box = found["box"]
        assert box_iou((box["x_min"], box["y_min"], box["x_max"], box["y_max"]), scene_box(obj, 224, 224)) > 0.75


def test_segment_returns_the_drawn_shapes_mask(client):
    scene = SCENE.scene()
    for obj in scene.objects:
        response = client.post("/v1/segment", files=_upload(), data={"objects": obj.name})
        assert response.status_code == 200, response.text
        [segment] = response.json()["segments"]
        assert segment["label"] == obj.name and segment["mask_error"] is None
        mask = decode_rle(segment["mask"])
        assert mask.shape == (224, 224)
        assert mask_iou(object_mask(obj), mask) > 0.7


def test_caption_vqa_and_ocr_of_shipped_scenes(client):
    from app.demo import answers

    for shipped in SHIPPED:
        scene = shipped.scene()
        upload = files((STATIC_SCENES / shipped.file_name).read_bytes(), shipped.file_name, "image/png")
        caption = client.post("/v1/caption", files=upload).json()["text"]
        assert caption == answers.caption(scene)
        count = client.post("/v1/vqa", files=upload, data={"question": answers.HOW_MANY}).json()["answer"]
        assert count == answers.count_answer(scene)
        text = client.post("/v1/ocr", files=upload).json()["text"]
        assert text == answers.ocr_answer(scene)
