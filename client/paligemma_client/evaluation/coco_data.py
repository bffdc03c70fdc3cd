"""COCO annotations -> detect/segment requests, and the server's answers -> COCO results (no pycocotools).

Each image is asked for its categories by name (`detect red circle ; blue square`); each returned object
becomes a category again by its label, compared after `label_key` (whitespace collapsed, lower-cased,
as the server cleans the names it is sent). Boxes become COCO `[x, y, width, height]` in pixels, masks
stay the server's COCO RLE. PaliGemma gives no confidence, so every result has score 1.0.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paligemma_client.evaluation.text import DatasetError
from paligemma_client.models import Box, DetectResponse, Segment, SegmentResponse

SCORE = 1.0  # PaliGemma emits no confidence: one operating point (docs/eval.md says what that means for AP)
SEPARATOR = ";"  # separates objects in a PaliGemma prompt, so no category name may hold it


def label_key(name: str) -> str:
    """The form names and labels are compared in: whitespace collapsed, lower-cased."""
    return " ".join(name.split()).lower()


@dataclass(frozen=True)
class ImageEntry:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoDataset:
    """A COCO annotation file, checked: `data` is its JSON, the rest indexes it."""

    path: Path
    data: dict[str, Any]
    images: dict[int, ImageEntry]
    categories: dict[int, str]  # id -> name as written
    category_ids: dict[str, int]  # label_key(name) -> id
    annotated: dict[int, list[int]]  # image id -> the category ids annotated in it, in id order


def load_dataset(path: Path, masks: bool) -> CocoDataset:
    """Read and check a COCO annotation file (`masks`: every annotation needs a `segmentation`). Raises
    DatasetError naming what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                              ("images", "annotations", "categories")):
        raise DatasetError(f"{path}: a COCO annotation file is an object with the lists `images`, "
                           "`annotations` and `categories`")
    images = {entry.id: entry for entry in (_image(item, path) for item in data["images"])}
    categories: dict[int, str] = {}
    category_ids: dict[str, int] = {}
    for item in data["categories"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or not isinstance(
                item.get("name"), str) or not label_key(item["name"]):
            raise DatasetError(f"{path}: every category needs an integer `id` and a non-empty `name`: "
                               f"{item!r}")
        name, key = item["name"], label_key(item["name"])
        if SEPARATOR in name:
            raise DatasetError(f"{path}: category {name!r} holds {SEPARATOR!r}, which separates objects in a "
                               "PaliGemma prompt; rename it")
        if key in category_ids:
            raise DatasetError(f"{path}: categories {categories[category_ids[key]]!r} and {name!r} are the "
                               "same name once spacing and case are ignored; labels cannot tell them apart")
        categories[item["id"]], category_ids[key] = name, item["id"]
    annotated: dict[int, set[int]] = {image_id: set() for image_id in images}
    for item in data["annotations"]:
        _check_annotation(item, path, images, categories, masks)
        annotated[item["image_id"]].add(item["category_id"])
    if not images:
        raise DatasetError(f"{path}: no images")
    return CocoDataset(path, data, images, categories, category_ids,
                       {image_id: sorted(ids) for image_id, ids in annotated.items()})


def _image(item: object, path: Path) -> ImageEntry:
    if not isinstance(item, dict) or not isinstance(item.get("id"), int) or not isinstance(
            item.get("file_name"), str) or not all(isinstance(item.get(k), int) and item[k] > 0
                                                   for k in ("width", "height")):
        raise DatasetError(f"{path}: every image needs an integer `id`, a `file_name` and its `width` and "
                           f"`height` in pixels: {str(item)[:200]}")
    return ImageEntry(item["id"], item["file_name"], item["width"], item["height"])


def _check_annotation(item: object, path: Path, images: dict[int, ImageEntry], categories: dict[int, str],
                      masks: bool) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("id"), int):
        raise DatasetError(f"{path}: every annotation needs an integer `id`: {str(item)[:200]}")
    where = f"{path}: annotation {item['id']}"
    if item.get("image_id") not in images:
        raise DatasetError(f"{where}: `image_id` {item.get('image_id')!r} is not among the images")
    if item.get("category_id") not in categories:
        raise DatasetError(f"{where}: `category_id` {item.get('category_id')!r} is not among the categories")
    bbox = item.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise DatasetError(f"{where}: `bbox` must be [x, y, width, height] in pixels")
    if masks and not item.get("segmentation"):
        raise DatasetError(f"{where}: no `segmentation` (polygons or RLE); segment evaluation needs masks")


@dataclass(frozen=True)
class LocateRequest:
    """One detect/segment request: an image and the names asked for (one part of them, when the image
    has more than the server takes in one request)."""

    image: ImageEntry
    path: Path
    objects: tuple[str, ...]
    part: int = 1
    parts: int = 1

    @property
    def name(self) -> str:
        """How failures name it."""
        return str(self.path) if self.parts == 1 else f"{self.path} (request {self.part} of {self.parts})"


def plan_requests(dataset: CocoDataset, images_dir: Path, all_categories: bool,
                  max_objects: int) -> list[LocateRequest]:
    """The requests, image by image (in id order): the names of the categories annotated in the image, or
    of every category, at most `max_objects` a request. An image with nothing to ask is not sent."""
    every = sorted(dataset.categories)
    requests = []
    for image_id in sorted(dataset.images):
        image = dataset.images[image_id]
        names = [dataset.categories[c] for c in (every if all_categories else dataset.annotated[image_id])]
        parts = [names[i:i + max_objects] for i in range(0, len(names), max_objects)]
        requests += [LocateRequest(image, images_dir / image.file_name, tuple(part), n, len(parts))
                     for n, part in enumerate(parts, 1)]
    return requests


def check_size(request: LocateRequest, response: DetectResponse | SegmentResponse) -> None:
    """Refuse an answer for an image of another size than the annotations say: its boxes and masks would
    be compared in the wrong pixels."""
    got, want = response.image, request.image
    if (got.width, got.height) != (want.width, want.height):
        raise ValueError(f"the server read a {got.width}x{got.height} image; the annotations say "
                         f"{want.width}x{want.height} (is it the same file? EXIF rotation?)")


def coco_box(box: Box) -> list[float]:
    return [box.x_min, box.y_min, box.x_max - box.x_min, box.y_max - box.y_min]


@dataclass
class Results:
    """The answers as COCO results, and what could not become one."""

    items: list[dict[str, Any]] = field(default_factory=list)
    unmatched: Counter[str] = field(default_factory=Counter)  # labels that name no category
    without_mask: int = 0  # segments the server decoded no mask for
    dropped: int = 0  # malformed objects the server dropped from its answers
    truncated: int = 0  # answers cut off by max_new_tokens

    def add(self, dataset: CocoDataset, request: LocateRequest, response: DetectResponse | SegmentResponse
            ) -> None:
        self.dropped += response.dropped
        self.truncated += response.finish_reason == "length"
        objects = response.detections if isinstance(response, DetectResponse) else response.segments
        for obj in objects:
            category = dataset.category_ids.get(label_key(obj.label))
            if category is None:
                self.unmatched[obj.label] += 1
                continue
            item: dict[str, Any] = {"image_id": request.image.id, "category_id": category}
            if isinstance(obj, Segment):
                if obj.mask is None:
                    self.without_mask += 1
                    continue
                # No "bbox": pycocotools would then take the box's area for the mask's (small/medium/large).
                # The model's own box travels as "box", which pycocotools ignores.
                item.update(segmentation=obj.mask.model_dump(), box=coco_box(obj.box))
            else:
                item["bbox"] = coco_box(obj.box)
            item["score"] = SCORE
            self.items.append(item)


def scored_images(requests: Sequence[LocateRequest], answers: dict[int, Any]) -> list[int]:
    """The ids of the images whose every request was answered (`answers` by request index)."""
    failed = {request.image.id for i, request in enumerate(requests) if i not in answers}
    return sorted({request.image.id for request in requests} - failed)


def collect(dataset: CocoDataset, requests: Sequence[LocateRequest],
            answers: dict[int, DetectResponse | SegmentResponse]) -> Results:
    """The results of the `scored_images`, in request order (image id, then the order the model wrote
    them: with one score for all, that order is how COCOeval ranks them)."""
    scored = set(scored_images(requests, answers))
    results = Results()
    for i, request in enumerate(requests):
        if request.image.id in scored:
            results.add(dataset, request, answers[i])
    return results
