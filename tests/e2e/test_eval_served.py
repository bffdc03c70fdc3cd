"""`paligemma eval` against a served model whose answers are known (tests/trained_model.py): its numbers
equal pycocotools' own evaluation of the predictions it saved, and exact match / CER follow the rules."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from paligemma_client import PaliGemmaClient
from paligemma_client.cli import main
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.trained_model import image_bytes, training_image

WIDTH, HEIGHT = 640, 400
IMAGE = image_bytes(training_image().resize((WIDTH, HEIGHT)))
SUMMARY = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


@pytest.fixture(scope="module")
def known(trained_server, tmp_path_factory) -> dict:
    """What the model answers for IMAGE, asked directly: the ground truth the datasets below build on."""
    path = tmp_path_factory.mktemp("known") / "photo.png"
    path.write_bytes(IMAGE)
    with PaliGemmaClient(trained_server.url, api_key=trained_server.key) as client:
        detected = client.detect(path, ["red box"])
        segment = client.segment(path, ["red box"]).segments[0]
        return {"box": next(d.box for d in detected.detections if d.label == "red box"),
                "labels": [d.label for d in detected.detections], "mask": segment.mask.model_dump(),
                "caption": client.caption(path).text, "ocr": client.ocr(path).text,
                "vqa": client.vqa(path, "what is it?").answer}


@pytest.fixture
def server(trained_server, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_URL", trained_server.url)
    monkeypatch.setenv("PALIGEMMA_API_KEY", trained_server.key)


def eval_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(["eval", *argv], out, err), out.getvalue(), err.getvalue()


def xywh(box, dx: float = 0.0) -> list[float]:
    return [box.x_min + dx, box.y_min, box.x_max - box.x_min, box.y_max - box.y_min]


def write_coco(folder: Path, boxes: dict[str, list[float] | None], categories: list[str],
               segmentations: dict[str, object] | None = None) -> Path:
    """images/ with IMAGE under each name (None: a corrupt file), and a COCO file with one "red box" per image."""
    (folder / "images").mkdir()
    data: dict = {"images": [], "annotations": [],
                  "categories": [{"id": i, "name": name} for i, name in enumerate(categories, 1)]}
    for image_id, (name, bbox) in enumerate(boxes.items(), 1):
        (folder / "images" / name).write_bytes(IMAGE[:200] if bbox is None else IMAGE)
        data["images"].append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
        bbox = bbox or [100, 100, 50, 50]
        ann = {"id": image_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "area": bbox[2] * bbox[3],
               "iscrowd": 0}
        if segmentations is not None:
            ann["segmentation"] = segmentations[name]
        data["annotations"].append(ann)
    path = folder / "coco.json"
    path.write_text(json.dumps(data))
    return path


def direct(gt_path: Path, predictions: Path, iou_type: str, image_ids: list[int]) -> COCOeval:
    """pycocotools on its own, from the two files."""
    gt = COCO(str(gt_path))
    evaluation = COCOeval(gt, gt.loadRes(str(predictions)), iou_type)
    evaluation.params.imgIds = image_ids
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation


def assert_same_as(document: dict, evaluation: COCOeval) -> None:
    assert [document[k] for k in SUMMARY] == [None if v < 0 else v for v in evaluation.stats[:6]]
    precision = evaluation.eval["precision"]
    names = {c["id"]: c["name"] for c in evaluation.cocoGt.dataset["categories"]}
    for k, category in enumerate(evaluation.params.catIds):
        every, at_50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        assert document["per_category"][names[category]]["AP"] == (every[every > -1].mean() if (every > -1).any()
                                                                     else None)
        assert document["per_category"][names[category]]["AP50"] == (at_50[at_50 > -1].mean()
                                                                       if (at_50 > -1).any() else None)


def box_iou(a: list[float], b: list[float]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_ground_truth_equal_to_the_models_boxes_scores_1(server, known, tmp_path):
    gt = write_coco(tmp_path, {"a.png": xywh(known["box"]), "b.png": xywh(known["box"])}, ["red box", "box"])
    saved = tmp_path / "predictions.json"
    code, out, err = eval_cli("detect", "--coco", str(gt), "--images", str(tmp_path / "images"), "--json",
                              "--save-predictions", str(saved))
    assert code == 0, err
    document = json.loads(out)
    assert (document["AP"], document["AP50"], document["AP75"], document["AP_large"]) == pytest.approx((1, 1, 1, 1))
    assert (document["recall_50"], document["mean_best_iou"], document["objects"]) == (1.0, 1.0, 2)
    # The model's second object is labelled "box": a category here, with no ground truth (no AP of its own).
    assert known["labels"] == ["red box", "box"]
    assert document["per_category"]["box"] == {"AP": None, "AP50": None, "objects": 0, "recall_50": None,
                                               "mean_best_iou": None}
    assert document["predictions"] == 4 and document["unmatched_labels"] == {}
    predictions = json.loads(saved.read_text())
    assert [(p["image_id"], p["category_id"], p["score"]) for p in predictions] == [
        (1, 1, 1.0), (1, 2, 1.0), (2, 1, 1.0), (2, 2, 1.0)]
    assert_same_as(document, direct(gt, saved, "bbox", [1, 2]))
    assert "2 requests in" in err and "2 ok, 0 failed" in err


def test_shifted_ground_truth_scores_what_pycocotools_computes_and_failures_are_listed(server, known, tmp_path):
    shift = {"a.png": 30.0, "b.png": 200.0, "c.png": 0.0}
    boxes: dict[str, list[float] | None] = {name: xywh(known["box"], dx) for name, dx in shift.items()}
    boxes["broken.png"] = None  # a truncated file: the server refuses it
    gt = write_coco(tmp_path, boxes, ["red box"])
    saved = tmp_path / "predictions.json"
    code, out, err = eval_cli("detect", "--coco", str(gt), "--images", str(tmp_path / "images"), "--json",
                              "--save-predictions", str(saved), "--concurrency", "2", "--progress", "always")
    assert code == 1
    document = json.loads(out)
    broken = tmp_path / "images" / "broken.png"
    [failure] = document["failures"]
    assert failure["image"] == str(broken) and failure["error"].startswith("400 invalid_image")
    assert f"  {broken}: 400 invalid_image" in err and "4 requests in" in err and "3 ok, 1 failed" in err
    assert "] 4/4 failed 1" in err  # the progress bar's last state
    assert (document["images"], document["images_scored"], document["requests"], document["failed"],
            document["failed_image_ids"]) == (4, 3, 4, 1, [4])
    assert document["unmatched_labels"] == {"box": 3}  # no such category here: reported, not scored

    evaluation = direct(gt, saved, "bbox", [1, 2, 3])
    assert_same_as(document, evaluation)
    assert 0 < document["AP"] < document["AP50"] < 1  # c.png exact, a.png shifted a little, b.png a lot

    predictions = json.loads(saved.read_text())
    best = [max([box_iou(p["bbox"], boxes[name]) for p in predictions if p["image_id"] == image_id] or [0.0])
            for image_id, name in enumerate(shift, 1)]
    assert best[2] == pytest.approx(1.0) and best[1] < 0.5 < best[0] < 1
    assert document["recall_50"] == pytest.approx(2 / 3)
    assert document["mean_best_iou"] == pytest.approx(sum(best) / 3)


def test_segment_scores_masks_as_pycocotools_does(server, known, tmp_path):
    exact, box_polygon = known["mask"], [[80.0, 100.0, 560.0, 100.0, 560.0, 300.0, 80.0, 300.0]]
    gt = write_coco(tmp_path, {"same.png": xywh(known["box"]), "other.png": [80, 100, 480, 200]}, ["red box"],
                    {"same.png": exact, "other.png": box_polygon})
    saved = tmp_path / "masks.json"
    code, out, err = eval_cli("segment", "--coco", str(gt), "--images", str(tmp_path / "images"), "--json",
                              "--save-predictions", str(saved))
    assert code == 0, err
    document = json.loads(out)
    assert document["iou_type"] == "segm" and document["without_mask"] == 0
    assert_same_as(document, direct(gt, saved, "segm", [1, 2]))

    predictions = json.loads(saved.read_text())
    assert [p["segmentation"] for p in predictions] == [exact, exact]  # the server's RLE, as sent
    predicted = coco_mask.decode({"size": exact["size"], "counts": exact["counts"].encode()}).astype(bool)
    polygon = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(box_polygon, HEIGHT, WIDTH))).astype(bool)
    other_iou = (predicted & polygon).sum() / (predicted | polygon).sum()
    assert 0 < other_iou < 0.9
    assert document["mean_mask_iou"] == pytest.approx((1.0 + other_iou) / 2)
    assert document["per_category"]["red box"]["mean_mask_iou"] == document["mean_mask_iou"]
    # The same mask as the ground truth alone: every number is 1.
    code, out, _ = eval_cli("segment", "--coco", str(_only(gt, 1)), "--images", str(tmp_path / "images"), "--json")
    assert code == 0
    alone = json.loads(out)
    assert (alone["AP"], alone["AP50"], alone["AP75"], alone["mean_mask_iou"]) == pytest.approx((1, 1, 1, 1))


def _only(path: Path, image_id: int) -> Path:
    data = json.loads(path.read_text())
    data["images"] = [i for i in data["images"] if i["id"] == image_id]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == image_id]
    out = path.with_name(f"only-{image_id}.json")
    out.write_text(json.dumps(data))
    return out


def test_every_category_is_asked_in_requests_of_at_most_max_objects(server, known, tmp_path):
    gt = write_coco(tmp_path, {"a.png": xywh(known["box"])}, ["red box", "box", "green circle"])
    code, out, err = eval_cli("detect", "--coco", str(gt), "--images", str(tmp_path / "images"), "--json",
                              "--all-categories", "--max-objects", "2")
    document = json.loads(out)
    assert code == 0, err
    assert (document["requests"], document["images_scored"]) == (2, 1)
    assert set(document["per_category"]) == {"red box", "box", "green circle"}
    assert set(document) >= {"AP", "AP50", "AP75", "per_category", "recall_50", "mean_best_iou", "images",
                             "requests", "failed", "failures"}


def write_jsonl(folder: Path, lines: list[dict]) -> Path:
    (folder / "images").mkdir(exist_ok=True)
    (folder / "images" / "photo.png").write_bytes(IMAGE)
    (folder / "images" / "broken.png").write_bytes(IMAGE[:200])
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_caption_exact_match_is_stripped_and_lower_cased_and_needs_no_pycocotools(server, known, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # caption/vqa/ocr work without the extra
    assert known["caption"] == "a red box on white"
    data = write_jsonl(tmp_path, [
        {"image": "images/photo.png", "answers": ["  A Red Box on White\n"]},
        {"image": "images/photo.png", "answers": ["a blue box", "a red box"]},
        {"image": str(tmp_path / "images" / "photo.png"), "answers": ["x", "a red box on white"]},
        {"image": "images/broken.png", "answers": ["a red box on white"]},
    ])
    saved = tmp_path / "captions.jsonl"
    code, out, err = eval_cli("caption", "--jsonl", str(data), "--json", "--save-predictions", str(saved))
    assert code == 1
    document = json.loads(out)
    assert document["exact_match"] == pytest.approx(2 / 3)
    assert (document["images"], document["answered"], document["failed"]) == (4, 3, 1)
    assert document["failures"][0]["image"] == str(tmp_path / "images" / "broken.png")
    assert f"{tmp_path / 'images' / 'broken.png'}: 400 invalid_image" in err
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [(line["line"], line["prediction"], line["exact_match"]) for line in lines] == [
        (1, "a red box on white", True), (2, "a red box on white", False), (3, "a red box on white", True)]


def test_ocr_reports_exact_match_as_is_and_the_character_error_rate(server, known, tmp_path):
    text = known["ocr"]
    assert text  # the tiny model reads some text (it is not trained for OCR: what matters is that it is known)
    data = write_jsonl(tmp_path, [
        {"image": "images/photo.png", "answers": [text]},
        {"image": "images/photo.png", "answers": [text.upper() + "?", text + "xy"]},
    ])
    code, out, _ = eval_cli("ocr", "--jsonl", str(data), "--json")
    assert code == 0
    document = json.loads(out)
    assert document["exact_match"] == 0.5  # an upper-cased answer is another text
    assert document["cer"] == pytest.approx((0 + 2 / (len(text) + 2)) / 2)  # the closer answer: 2 deletions
    code, out, _ = eval_cli("ocr", "--jsonl", str(data))
    assert code == 0 and "exact_match 0.500" in out and "cer " in out


def test_vqa_sends_each_question(server, known, tmp_path):
    data = write_jsonl(tmp_path, [{"image": "images/photo.png", "question": "what is it?",
                                   "answers": [known["vqa"].upper()]}])
    code, out, _ = eval_cli("vqa", "--jsonl", str(data))
    assert code == 0 and "exact_match 1.000" in out
    data.write_text(json.dumps({"image": "images/photo.png", "answers": ["red"]}) + "\n")
    with pytest.raises(SystemExit) as raised:
        eval_cli("vqa", "--jsonl", str(data))
    assert raised.value.code == 2
