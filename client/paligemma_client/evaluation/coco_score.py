"""COCO results scored with pycocotools (the client's `eval` extra), and per-object localisation.

`COCOeval` gives AP over IoU 0.50:0.95, AP50, AP75 and AP by object size, exactly as pycocotools computes
them from the results (the same numbers as `COCOeval` run on the saved predictions file). Beside it, for
datasets with one instance per name, the numbers big_vision's PaliGemma segmentation evaluator reports
(`boxacc/0.5` and `miou`): for each ground-truth object, the best IoU any prediction of its category in its
image reaches (0 when there is none); `recall_50` is the share of objects where that is >= 0.5,
`mean_best_iou` its mean over objects, and for masks `mean_mask_iou` the same with mask IoU.

pycocotools (and numpy, which it brings) are imported where they are used, so the rest of the client
works without the extra; `require()` says how to install it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paligemma_client.evaluation.coco_data import CocoDataset

if TYPE_CHECKING:
    import numpy as np
    from pycocotools.coco import COCO

INSTALL_HINT = "pip install 'paligemma-client[eval]'"
SUMMARY = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")  # COCOeval.stats[0:6]
RECALL_IOU = 0.5


class MissingExtra(ImportError):
    """pycocotools is not installed."""


def require() -> None:
    """Raise MissingExtra, saying how to install it, unless pycocotools can be imported."""
    try:
        import pycocotools.coco
        import pycocotools.cocoeval
        import pycocotools.mask  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(f"scoring boxes and masks needs pycocotools, which is not installed: "
                           f"{INSTALL_HINT}") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pycocotools prints its progress on stdout, where `--json` writes the one document."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def ground_truth(dataset: CocoDataset, iou_type: str) -> COCO:
    """The annotations as pycocotools' COCO object; `iscrowd` (0) and `area` (the box's, or for masks the
    mask's) filled in where the file leaves them out, since COCOeval reads both."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(dataset.data)
    for ann in coco.dataset["annotations"]:
        ann.setdefault("iscrowd", 0)
    with _quiet():
        coco.createIndex()
    for ann in coco.dataset["annotations"]:
        if "area" not in ann:
            w, h = ann["bbox"][2:]
            ann["area"] = float(mask_utils.area(coco.annToRLE(ann))) if iou_type == "segm" else w * h
    return coco


def loaded_results(gt: COCO, items: Sequence[dict[str, Any]]) -> COCO:
    """The results as pycocotools loads them, through JSON as the saved file reads back (loadRes writes
    into the dicts it is given, and cannot load an empty list)."""
    from pycocotools.coco import COCO

    items = json.loads(json.dumps(list(items)))
    if items:
        with _quiet():
            return gt.loadRes(items)
    empty = COCO()
    empty.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                     "annotations": []}
    with _quiet():
        empty.createIndex()
    return empty


def _value(x: float) -> float | None:
    return None if x < 0 else float(x)  # COCOeval writes -1 where nothing is defined (no such objects)


@dataclass(frozen=True)
class CocoScores:
    summary: dict[str, float | None]  # SUMMARY's keys
    per_category: dict[int, dict[str, float | None]]  # category id -> {"AP", "AP50"}


def coco_scores(gt: COCO, dt: COCO, iou_type: str, image_ids: Sequence[int]) -> CocoScores:
    """COCOeval over `image_ids` (defaults otherwise: IoU 0.50:0.95, 100 detections an image). A category's
    AP is the mean of its precision over IoU thresholds and recall points, as COCOeval averages AP."""
    from pycocotools.cocoeval import COCOeval

    if not image_ids:  # COCOeval would take an empty list as "every image"
        return CocoScores(dict.fromkeys(SUMMARY), {c: {"AP": None, "AP50": None} for c in gt.getCatIds()})
    evaluation = COCOeval(gt, dt, iou_type)
    evaluation.params.imgIds = sorted(image_ids)
    with _quiet():
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    summary = {name: _value(evaluation.stats[i]) for i, name in enumerate(SUMMARY)}
    precision = evaluation.eval["precision"]  # [IoU threshold, recall, category, area range, max detections]
    per_category = {}
    for k, category in enumerate(evaluation.params.catIds):
        every, at_50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]  # area "all", 100 detections
        per_category[category] = {"AP": _mean_defined(every), "AP50": _mean_defined(at_50)}
    return CocoScores(summary, per_category)


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


@dataclass(frozen=True)
class ObjectMatch:
    """One ground-truth object and the best IoU a prediction of its category reached."""

    category_id: int
    box_iou: float
    mask_iou: float | None  # with masks only


def object_matches(gt: COCO, items: Sequence[dict[str, Any]], image_ids: Sequence[int],
                   masks: bool) -> list[ObjectMatch]:
    """For every ground-truth object (crowd regions aside: COCO only ignores them) of the images, its best
    box IoU (and mask IoU) with a prediction of its category."""
    predicted: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        predicted[item["image_id"], item["category_id"]].append(item)
    matches = []
    for image_id in sorted(image_ids):
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=[image_id], iscrowd=False)):
            mine = predicted.get((image_id, ann["category_id"]), [])
            box_iou = _best([item.get("bbox", item.get("box")) for item in mine], ann["bbox"])
            mask_iou = _best([item["segmentation"] for item in mine], gt.annToRLE(ann)) if masks else None
            matches.append(ObjectMatch(ann["category_id"], box_iou, mask_iou))
    return matches


def _best(predictions: list[Any], target: Any) -> float:
    import numpy as np
    from pycocotools import mask as mask_utils

    if not predictions:
        return 0.0
    return float(np.max(mask_utils.iou(predictions, [target], [0])))


def localisation(matches: Sequence[ObjectMatch], masks: bool) -> dict[str, float | int | None]:
    """`objects`, `recall_50`, `mean_best_iou` and with masks `mean_mask_iou` (None without objects)."""
    count = len(matches)
    numbers: dict[str, float | int | None] = {
        "objects": count,
        "recall_50": sum(m.box_iou >= RECALL_IOU for m in matches) / count if count else None,
        "mean_best_iou": sum(m.box_iou for m in matches) / count if count else None,
    }
    if masks:
        numbers["mean_mask_iou"] = sum(m.mask_iou or 0.0 for m in matches) / count if count else None
    return numbers
