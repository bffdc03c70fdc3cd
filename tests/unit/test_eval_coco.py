"""`paligemma eval detect|segment` without a server: the COCO file checked, the requests planned, answers
turned into COCO results, the localisation numbers, and the message when pycocotools is missing."""

from __future__ import annotations

import copy
import io
import json
import sys

import httpx
import numpy as np
import pytest
from paligemma_client.cli import build_parser, main
from paligemma_client.evaluation import cli as evaluation
from paligemma_client.evaluation import coco_score, report
from paligemma_client.evaluation.coco_data import (
    CocoDataset,
    Results,
    check_size,
    collect,
    label_key,
    load_dataset,
    plan_requests,
)
from paligemma_client.evaluation.text import DatasetError
from paligemma_client.models import DetectResponse, ModelCard, SegmentResponse
from pycocotools import mask as coco_mask

CATEGORIES = [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue  Square"}, {"id": 5, "name": "green star"}]


def dataset_json(**changes) -> dict:
    data = {
        "images": [{"id": 10, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 3, "file_name": "sub/b.png", "width": 100, "height": 80},
                   {"id": 7, "file_name": "c.png", "width": 100, "height": 80}],
        "categories": CATEGORIES,
        "annotations": [{"id": 1, "image_id": 10, "category_id": 2, "bbox": [10, 10, 20, 20]},
                        {"id": 2, "image_id": 10, "category_id": 1, "bbox": [50, 40, 30, 30]},
                        {"id": 3, "image_id": 3, "category_id": 2, "bbox": [0, 0, 50, 40]}],
    }
    for ann in data["annotations"]:  # as COCO files have them (the evaluation fills them in when left out)
        ann.update(area=ann["bbox"][2] * ann["bbox"][3], iscrowd=0)
    data.update(changes)
    return data


def write(tmp_path, data) -> CocoDataset:
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    return load_dataset(path, masks=False)


def response(kind: str, objects: list[tuple[str, list[float]]], width: int = 100, height: int = 80,
             **extra) -> DetectResponse | SegmentResponse:
    """A response body as the server sends it (the fields of app/schemas.py)."""
    items = []
    for label, (x1, y1, x2, y2) in objects:
        box = {"x_min": x1, "y_min": y1, "x_max": x2, "y_max": y2}
        item = {"label": label, "box": box,
                "box_normalized": {k: v / (width if k[0] == "x" else height) for k, v in box.items()}}
        if kind == "segment":
            mask = np.zeros((height, width), np.uint8, order="F")
            mask[int(y1):int(y2), int(x1):int(x2)] = 1
            rle = coco_mask.encode(mask)
            item.update(mask={"size": rle["size"], "counts": rle["counts"].decode()}, mask_tokens=[0] * 16)
        items.append(item)
    body = {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            "image": {"width": width, "height": height}, "finish_reason": "stop", "raw_text": "",
            "timings": {"prepare_ms": 0, "queue_and_inference_ms": 0, "postprocess_ms": 0, "total_ms": 0},
            "dropped": 0, ("segments" if kind == "segment" else "detections"): items, **extra}
    model = SegmentResponse if kind == "segment" else DetectResponse
    return model.model_validate(body)


def test_each_image_asks_for_its_annotated_categories_by_name(tmp_path):
    dataset = write(tmp_path, dataset_json())
    requests = plan_requests(dataset, tmp_path / "images", all_categories=False, max_objects=16)
    # In image id order; an image with nothing annotated is not sent.
    assert [(r.image.id, r.path, r.objects) for r in requests] == [
        (3, tmp_path / "images" / "sub" / "b.png", ("blue  Square",)),
        (10, tmp_path / "images" / "a.png", ("red circle", "blue  Square")),
    ]


def test_all_categories_are_split_into_requests_the_server_takes(tmp_path):
    dataset = write(tmp_path, dataset_json())
    requests = plan_requests(dataset, tmp_path, all_categories=True, max_objects=2)
    assert [(r.image.id, r.objects, r.part, r.parts) for r in requests] == [
        (3, ("red circle", "blue  Square"), 1, 2), (3, ("green star",), 2, 2),
        (7, ("red circle", "blue  Square"), 1, 2), (7, ("green star",), 2, 2),
        (10, ("red circle", "blue  Square"), 1, 2), (10, ("green star",), 2, 2),
    ]
    assert requests[1].name == f"{tmp_path / 'sub' / 'b.png'} (request 2 of 2)"
    assert plan_requests(dataset, tmp_path, True, 16)[0].name == str(tmp_path / "sub" / "b.png")


@pytest.mark.parametrize(("change", "message"), [
    ({"categories": [*CATEGORIES, {"id": 9, "name": "Red   Circle"}]}, "are the same name once spacing and case"),
    ({"categories": [{"id": 1, "name": "cat ; dog"}]}, "holds ';'"),
    ({"categories": [{"id": 1, "name": "  "}]}, "non-empty `name`"),
    ({"images": [{"id": 10, "file_name": "a.png"}]}, "`width` and `height`"),
    ({"annotations": [{"id": 1, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}]}, "`image_id` 99 is not"),
    ({"annotations": [{"id": 1, "image_id": 10, "category_id": 4, "bbox": [0, 0, 1, 1]}]}, "`category_id` 4 is not"),
    ({"annotations": [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1]}]}, "`bbox` must be"),
    ({"annotations": [{"image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1]}]}, "integer `id`"),
    ({"images": [], "annotations": []}, "no images"),
])
def test_a_bad_annotation_file_is_refused_saying_why(tmp_path, change, message):
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
        write(tmp_path, dataset_json(**change))


def test_segment_evaluation_needs_masks_and_any_file_must_be_coco_json(tmp_path):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(dataset_json()))
    with pytest.raises(DatasetError, match="annotation 1: no `segmentation`"):
        load_dataset(path, masks=True)
    path.write_text('{"images": []')
    with pytest.raises(DatasetError, match="cannot be read as JSON"):
        load_dataset(path, masks=False)
    path.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DatasetError, match="the lists `images`, `annotations` and `categories`"):
        load_dataset(path, masks=False)


def test_labels_become_categories_by_name_ignoring_spacing_and_case(tmp_path):
    dataset = write(tmp_path, dataset_json())
    [request] = [r for r in plan_requests(dataset, tmp_path, False, 16) if r.image.id == 10]
    results = Results()
    results.add(dataset, request, response("detect", [
        ("Red Circle", [50.5, 40, 80, 70.25]), ("blue square", [10, 10, 30, 30]), ("purple blob", [0, 0, 5, 5]),
        ("green star", [1, 2, 3, 4]), ("purple blob", [0, 0, 6, 6])], dropped=2, finish_reason="length"))
    assert results.items == [
        {"image_id": 10, "category_id": 1, "bbox": [50.5, 40, 29.5, 30.25], "score": 1.0},
        {"image_id": 10, "category_id": 2, "bbox": [10, 10, 20, 20], "score": 1.0},
        {"image_id": 10, "category_id": 5, "bbox": [1, 2, 2, 2], "score": 1.0},  # a category not asked for
    ]
    assert results.unmatched == {"purple blob": 2}
    assert (results.dropped, results.truncated) == (2, 1)
    assert label_key("  Blue \t square ") == "blue square"


def test_segments_keep_the_servers_rle_and_leave_bbox_out(tmp_path):
    dataset = write(tmp_path, dataset_json())
    [request] = [r for r in plan_requests(dataset, tmp_path, False, 16) if r.image.id == 3]
    answer = response("segment", [("blue square", [0, 0, 40, 40]), ("blue square", [50, 0, 60, 10])])
    answer.segments[1].mask = None  # the server could not decode this one
    results = Results()
    results.add(dataset, request, answer)
    [item] = results.items
    assert set(item) == {"image_id", "category_id", "segmentation", "box", "score"}
    assert item["segmentation"] == answer.segments[0].mask.model_dump()
    assert item["box"] == [0, 0, 40, 40] and results.without_mask == 1


def test_an_answer_for_an_image_of_another_size_is_refused(tmp_path):
    dataset = write(tmp_path, dataset_json())
    request = plan_requests(dataset, tmp_path, False, 16)[0]
    check_size(request, response("detect", [], width=100, height=80))
    with pytest.raises(ValueError, match="the server read a 80x100 image; the annotations say 100x80"):
        check_size(request, response("detect", [], width=80, height=100))


def test_an_image_counts_only_when_all_its_requests_were_answered(tmp_path):
    dataset = write(tmp_path, dataset_json())
    requests = plan_requests(dataset, tmp_path, True, 2)  # two requests an image: 3, 3, 7, 7, 10, 10
    answers = {i: response("detect", [("green star", [0, 0, 10, 10])]) for i in (0, 1, 2, 4, 5)}
    results = collect(dataset, requests, answers)
    assert [item["image_id"] for item in results.items] == [3, 3, 10, 10]  # 7 lost one of its two


def _iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0, min(ax2, bx2) - max(a[0], b[0])) * max(0, min(ay2, by2) - max(a[1], b[1]))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_localisation_is_each_objects_best_iou_with_its_category(tmp_path):
    data = dataset_json()
    data["annotations"].append({"id": 4, "image_id": 10, "category_id": 1, "bbox": [0, 60, 10, 10], "iscrowd": 1})
    dataset = write(tmp_path, data)
    items = [{"image_id": 10, "category_id": 2, "bbox": [10, 10, 20, 10], "score": 1.0},  # IoU 0.5 with ann 1
             {"image_id": 10, "category_id": 2, "bbox": [15, 15, 20, 20], "score": 1.0},  # IoU 225/575
             {"image_id": 10, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 1.0},  # wrong place
             {"image_id": 3, "category_id": 1, "bbox": [0, 0, 50, 40], "score": 1.0}]  # right place, wrong name
    gt = coco_score.ground_truth(dataset, "bbox")
    matches = coco_score.object_matches(gt, items, [3, 10], masks=False)
    # Ann 1: best of 0.5 and 0.39; ann 2: no overlap; ann 3: no prediction of its category; the crowd region
    # (ann 4) is no object to find.
    assert [(m.category_id, m.box_iou) for m in matches] == [(2, 0.0), (2, 0.5), (1, 0.0)]
    assert _iou([10, 10, 20, 20], [15, 15, 20, 20]) < 0.5
    numbers = coco_score.localisation(matches, masks=False)
    assert numbers == {"objects": 3, "recall_50": 1 / 3, "mean_best_iou": 0.5 / 3}
    assert coco_score.localisation([], masks=True) == {"objects": 0, "recall_50": None, "mean_best_iou": None,
                                                       "mean_mask_iou": None}


def test_scores_are_cocoevals_on_the_results_as_saved(tmp_path):
    dataset = write(tmp_path, dataset_json())
    items = [{"image_id": 10, "category_id": 2, "bbox": [10, 10, 20, 20], "score": 1.0},
             {"image_id": 10, "category_id": 1, "bbox": [52, 40, 30, 30], "score": 1.0},
             {"image_id": 10, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0},
             {"image_id": 3, "category_id": 2, "bbox": [10, 0, 50, 40], "score": 1.0}]
    kept = copy.deepcopy(items)
    gt = coco_score.ground_truth(dataset, "bbox")
    scores = coco_score.coco_scores(gt, coco_score.loaded_results(gt, items), "bbox", [3, 7, 10])
    assert items == kept  # pycocotools' loadRes wrote into copies, not into what gets saved

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    (tmp_path / "gt.json").write_text(json.dumps(dataset_json()))
    (tmp_path / "dt.json").write_text(json.dumps(items))
    direct_gt = COCO(str(tmp_path / "gt.json"))
    direct = COCOeval(direct_gt, direct_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert [scores.summary[k] for k in coco_score.SUMMARY] == [
        None if v < 0 else v for v in direct.stats[:6]]
    assert 0 < scores.summary["AP"] < 1
    precision = direct.eval["precision"][:, :, :, 0, -1]
    for k, category in enumerate(direct.params.catIds):
        defined = precision[:, :, k][precision[:, :, k] > -1]
        assert scores.per_category[category]["AP"] == (defined.mean() if defined.size else None)
    assert scores.per_category[5] == {"AP": None, "AP50": None}  # no green star anywhere


def test_area_and_iscrowd_are_filled_in_where_left_out(tmp_path):
    data = dataset_json()
    data["annotations"][0].update(segmentation=[[10, 10, 30, 10, 10, 30]])  # a triangle: half the box
    for ann in data["annotations"]:
        del ann["area"], ann["iscrowd"]
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    boxes = coco_score.ground_truth(load_dataset(path, masks=False), "bbox")
    assert [(a["area"], a["iscrowd"]) for a in boxes.dataset["annotations"]] == [(400, 0), (900, 0), (2000, 0)]
    data["annotations"] = data["annotations"][:1]
    path.write_text(json.dumps(data))
    masks = coco_score.ground_truth(load_dataset(path, masks=True), "segm")
    triangle = coco_mask.merge(coco_mask.frPyObjects([[10, 10, 30, 10, 10, 30]], 80, 100))
    assert masks.dataset["annotations"][0]["area"] == coco_mask.area(triangle) < 400  # not the box's area


def test_no_predictions_score_zero_and_no_images_score_nothing(tmp_path):
    dataset = write(tmp_path, dataset_json())
    gt = coco_score.ground_truth(dataset, "bbox")
    scores = coco_score.coco_scores(gt, coco_score.loaded_results(gt, []), "bbox", [3, 10])
    assert scores.summary["AP"] == 0.0 and scores.per_category[1]["AP"] == 0.0
    nothing = coco_score.coco_scores(gt, coco_score.loaded_results(gt, []), "bbox", [])
    assert set(nothing.summary.values()) == {None}


def test_missing_pycocotools_exits_2_saying_how_to_install_it(tmp_path, monkeypatch):
    # The one simulated failure: pycocotools is installed here, so its import is made to fail.
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    for task in ("detect", "segment"):
        with pytest.raises(SystemExit) as raised:
            main(["eval", task, "--coco", str(tmp_path / "coco.json"), "--images", str(tmp_path)])
        assert raised.value.code == 2
    assert err.getvalue().count("pip install 'paligemma-client[eval]'") == 2
    assert "needs pycocotools, which is not installed" in err.getvalue()


@pytest.mark.parametrize(("argv", "message"), [
    (["--images", "{tmp}/missing"], "--images {tmp}/missing: no such folder"),
    (["--images", "{tmp}", "--max-objects", "0"], "--max-objects must be at least 1"),
    (["--images", "{tmp}", "--concurrency", "0"], "--concurrency must be at least 1"),
    (["--images", "{tmp}", "--save-predictions", "{tmp}/nowhere/p.json"], "the folder {tmp}/nowhere does not"),
])
def test_unusable_arguments_exit_2_before_anything_is_sent(tmp_path, monkeypatch, argv, message):
    (tmp_path / "coco.json").write_text(json.dumps(dataset_json()))
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(SystemExit) as raised:
        main(["eval", "detect", "--coco", str(tmp_path / "coco.json"), "--url", "http://127.0.0.1:9",
              *(a.format(tmp=tmp_path) for a in argv)])
    assert raised.value.code == 2
    assert message.format(tmp=tmp_path) in err.getvalue()
    assert "usage: paligemma eval detect" in err.getvalue()



def _card(masks: bool) -> dict:
    return {"object": "list", "data": [{
        "id": "m", "object": "model", "random_weights": False, "warning": None, "image_size": 224,
        "image_tokens": 256, "parameters": 1, "dtype": "float32", "device": "cpu", "masks": masks,
        "mask_decoder": None, "max_batch_size": 1, "max_prompt_tokens": 64, "decode_graphs": [],
        "max_new_tokens": 256, "default_max_new_tokens": 64}]}


def test_segment_refuses_a_server_without_masks_before_sending_an_image(tmp_path, monkeypatch):
    data = dataset_json()
    for ann in data["annotations"]:
        ann["segmentation"] = [[0, 0, 10, 0, 10, 10]]
    (tmp_path / "coco.json").write_text(json.dumps(data))
    paths = []

    def handle(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json=_card(masks=False))

    args = build_parser().parse_args(["eval", "segment", "--coco", str(tmp_path / "coco.json"), "--images",
                                      str(tmp_path), "--url", "http://server"])
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(SystemExit) as raised:
        evaluation.run(args, io.StringIO(), io.StringIO(), transport=httpx.MockTransport(handle))
    assert raised.value.code == 2 and paths == ["/v1/models"]
    assert "decodes no masks (/v1/models: masks false); start it with a mask decoder" in err.getvalue()


def test_an_unreachable_server_fails_the_run_with_nothing_scored(tmp_path):
    (tmp_path / "coco.json").write_text(json.dumps(dataset_json()))
    out, err = io.StringIO(), io.StringIO()
    code = main(["eval", "detect", "--coco", str(tmp_path / "coco.json"), "--images", str(tmp_path), "--url",
                 "http://127.0.0.1:9", "--json"], out, err)
    document = json.loads(out.getvalue())
    assert code == 1 and "no request sent: http://127.0.0.1:9/v1/models: GET http://127.0.0.1:9/v1/models failed" \
        in err.getvalue()
    assert (document["model"], document["AP"], document["images_scored"], document["failed"]) == (None, None, 0, 1)
    assert document["failed_image_ids"] == [3, 10]


def test_the_text_report_shows_every_number(tmp_path):
    dataset = write(tmp_path, dataset_json())
    requests = plan_requests(dataset, tmp_path, False, 16)
    results = Results()
    results.add(dataset, requests[1], response("detect", [("red circle", [50, 40, 80, 70]), ("cat", [0, 0, 1, 1])]))
    results.add(dataset, requests[0], response("detect", [("blue square", [0, 0, 50, 40])], finish_reason="length"))
    gt = coco_score.ground_truth(dataset, "bbox")
    scores = coco_score.coco_scores(gt, coco_score.loaded_results(gt, results.items), "bbox", [3, 10])
    matches = coco_score.object_matches(gt, results.items, [3, 10], masks=False)
    card = ModelCard.model_validate(_card(masks=False)["data"][0])
    document = report.locate_document("detect", card, None, dataset, requests, [3, 10], results, scores, matches, [])
    assert document["recall_50"] == pytest.approx(2 / 3)
    assert document["per_category"]["red circle"]["AP"] == pytest.approx(1.0)
    lines = report.locate_text(document).splitlines()
    assert lines[0] == "model: m"
    assert lines[1] == "3 images, 2 scored; 2 requests, 0 failed; 2 predictions"
    assert lines[2].startswith("bbox, pycocotools COCOeval (every score 1.0")
    assert lines[3].split()[:4] == ["AP", f"{document['AP']:.3f}", "AP50", f"{document['AP50']:.3f}"]
    assert lines[4].split() == ["recall_50", "0.667", "mean_best_iou", "0.667", "(3", "objects)"]
    assert lines[5].split() == ["category", "AP", "AP50", "objects", "recall_50", "mean_best_iou"]
    assert lines[6].split() == ["red", "circle", "1.000", "1.000", "1", "1.000", "1.000"]
    assert lines[8].split() == ["green", "star", "n/a", "n/a", "0", "n/a", "n/a"]
    assert lines[9:] == ["labels that name no category (1, not scored): 'cat' x1",
                         "1 answers cut off at max_new_tokens (raise --max-new-tokens)"]
