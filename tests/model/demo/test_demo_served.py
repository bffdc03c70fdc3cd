"""The shipped demo checkpoint, served as any checkpoint is (`PALIGEMMA_MODEL=demo`): it says what it is,
its masks are on without PALIGEMMA_MASK_DECODER, and on the playground's scenes it finds most objects
(boxes and masks), tells which kinds are there, counts them and captions them in its world's words."""

from __future__ import annotations

import re

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


@pytest.fixture(scope="module")
def client():
    with serve(Settings(model="demo")) as c:
        yield c


def test_models_says_what_the_demo_is_and_that_masks_are_on(client):
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == "demo" and card["about"] == ABOUT
    assert card["random_weights"] is False and card["warning"] is None
    assert card["masks"] is True
    assert card["mask_decoder"]["path"] == str(WEIGHTS_DIR / MASK_DECODER_FILE)
    assert card["mask_decoder"]["matches_published"] is False
    assert metric_value(client.get("/metrics").text, "paligemma_model_info", model="demo", dtype="float32",
                        device="cpu", random_weights="false", masks="true") == 1


def _shipped():
    for shipped in SHIPPED:
        data = (STATIC_SCENES / shipped.file_name).read_bytes()
        yield shipped.scene(), lambda data=data, name=shipped.file_name: files(data, name, "image/png")


# Floors for the shipped model on the playground's scenes, a little under what it measured there (docs/demo.md:
# 14 of 14 objects found at IoU >= 0.5, mean box IoU 0.85, mean mask IoU 0.83; all 60 "is there a {color}
# {shape}?" right, 5 of the 5 counts): a model that does not see the scene finds none of this. The
# held-out numbers, through the HTTP API, are in docs/demo.md.
FOUND_AT_LEAST = 12
MEAN_BOX_IOU = 0.7
MEAN_MASK_IOU = 0.68
# Of the 60 presence questions (each of the 12 kinds in each scene) a model that always answers "no" gets
# 46 right; of the 5 counts, one that always answers "3" gets 4, so the counts are a weak check of seeing
# and the presence answers the strong one.
PRESENCE_RIGHT_AT_LEAST = 57
COUNTS_RIGHT_AT_LEAST = 3


def test_detect_and_segment_find_the_objects_of_the_shipped_scenes(client):
    box_ious, mask_ious = [], []
    for scene, upload in _shipped():
        for obj in left_to_right(scene.objects):
            body = client.post("/v1/detect", files=upload(), data={"objects": obj.name}).json()
            assert body.get("warning") is None
            boxes = [(d["box"]["x_min"], d["box"]["y_min"], d["box"]["x_max"], d["box"]["y_max"])
                     for d in body["detections"] if d["label"] == obj.name]
            box_ious.append(max((box_iou(b, scene_box(obj, 224, 224)) for b in boxes), default=0.0))
            segments = client.post("/v1/segment", files=upload(), data={"objects": obj.name}).json()["segments"]
            assert all(s["label"] == obj.name and s["mask_error"] is None for s in segments)
            masks = [decode_rle(s["mask"]) for s in segments]
            assert all(m.shape == (224, 224) for m in masks)
            mask_ious.append(max((mask_iou(object_mask(obj), m) for m in masks), default=0.0))
    assert sum(iou >= 0.5 for iou in box_ious) >= FOUND_AT_LEAST, box_ious
    assert sum(box_ious) / len(box_ious) >= MEAN_BOX_IOU, box_ious
    assert sum(mask_ious) / len(mask_ious) >= MEAN_MASK_IOU, mask_ious


def test_presence_counts_and_captions_of_the_shipped_scenes(client):
    from app.demo import answers
    from app.demo.world import COLORS, SHAPES

    object_phrase = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    grammar = re.compile(rf"{object_phrase}((, {object_phrase})* and {object_phrase})?")
    presence_right = counts_right = 0
    for scene, upload in _shipped():
        for color in COLORS:
            for shape in SHAPES:
                answer = client.post("/v1/vqa", files=upload(), data={
                    "question": answers.presence_question(color, shape)}).json()["answer"]
                presence_right += answer == answers.presence_answer(scene, color, shape)
        count = client.post("/v1/vqa", files=upload(), data={"question": answers.HOW_MANY}).json()["answer"]
        assert count in {"1", "2", "3"}, count
        counts_right += count == answers.count_answer(scene)
        caption = client.post("/v1/caption", files=upload()).json()["text"]
        # Its captions are the world's sentences, naming colours the scene holds (the order of the
        # objects is often wrong: docs/demo.md).
        assert grammar.fullmatch(caption), caption
        assert set(re.findall("|".join(COLORS), caption)) <= {obj.color for obj in scene.objects}, caption
    assert presence_right >= PRESENCE_RIGHT_AT_LEAST
    assert counts_right >= COUNTS_RIGHT_AT_LEAST


def test_ocr_answers_a_word_of_its_world_only_where_the_scene_holds_one(client):
    from app.demo.world import WORDS

    for scene, upload in _shipped():
        text = client.post("/v1/ocr", files=upload()).json()["text"]
        # Which word it reads is not asked here (it read 2 of these 3 right, and 339 of 415 words
        # of four held-out sets: docs/demo.md), only that it answers one of its world's words where, and only where,
        # the scene holds one.
        assert (text in WORDS) if scene.word is not None else (text == ""), (scene.word, text)
