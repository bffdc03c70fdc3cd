"""How the demo's answers are scored against a scene: the targets of docs/demo.md. Pure numpy.

Detect: an object is found when some returned box has IoU >= 0.5 with its tight box; the mean of every
object's best IoU (0 when nothing came back) is the second number; where the boxes miss is told by the
median error of their vertical edges (x) and of their horizontal ones (y), in pixels of the 224 px canvas,
of each object's best box, and how the objects that were not found were missed (`detect_outcome`): no box
at all, a box on another object, or a box near the right one but too loose. Segment: the IoU of the
returned whole-image mask with the drawn shape's pixels. Caption, VQA and OCR: exact match; a caption
that names the right objects in the wrong order is counted apart (`caption_mistake`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

BoxXYXY = tuple[float, float, float, float]
FOUND_IOU = 0.5


def box_iou(a: BoxXYXY, b: BoxXYXY) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def best_iou(truth: BoxXYXY, predicted: Sequence[BoxXYXY]) -> float:
    return max((box_iou(truth, p) for p in predicted), default=0.0)


def edge_errors(truth: BoxXYXY, predicted: BoxXYXY, x_scale: float = 1.0, y_scale: float = 1.0
                ) -> tuple[float, float]:
    """Mean absolute error of the x edges (x_min, x_max) times `x_scale`, and of the y edges times
    `y_scale` (to bring an image of another size to the canvas's pixels)."""
    return (x_scale * (abs(predicted[0] - truth[0]) + abs(predicted[2] - truth[2])) / 2,
            y_scale * (abs(predicted[1] - truth[1]) + abs(predicted[3] - truth[3])) / 2)


def detect_outcome(truth: BoxXYXY, others: Sequence[BoxXYXY], predicted: Sequence[BoxXYXY]) -> str:
    """`found`, or why not: `empty` (no box), `other_object` (the best box for this object overlaps
    another object more than this one), `loose` (it is on this object, below IoU 0.5)."""
    if not predicted:
        return "empty"
    best = max(predicted, key=lambda box: box_iou(truth, box))
    if box_iou(truth, best) >= FOUND_IOU:
        return "found"
    on_others = max((box_iou(other, box) for other in others for box in predicted), default=0.0)
    return "other_object" if on_others > box_iou(truth, best) else "loose"


def _names(caption: str) -> list[str]:
    return caption.replace(" and ", ", ").split(", ")


def caption_mistake(answer: str, expected: str) -> str:
    """`right`, `order` (the same objects in another order) or `objects` (other objects named)."""
    if answer.strip() == expected:
        return "right"
    return "order" if sorted(_names(answer.strip())) == sorted(_names(expected)) else "objects"


def mask_iou(truth: np.ndarray, predicted: np.ndarray | None) -> float:
    if predicted is None:
        return 0.0
    union = np.logical_or(truth, predicted).sum()
    return float(np.logical_and(truth, predicted).sum() / union) if union else 1.0


@dataclass
class Tally:
    """Running scores; `summary()` gives the numbers the targets are stated in."""

    detect_ious: list[float] = field(default_factory=list)
    edge_errors: list[tuple[float, float]] = field(default_factory=list)  # (x, y) of each best box
    mask_ious: list[float] = field(default_factory=list)
    exact: dict[str, list[bool]] = field(default_factory=dict)
    detect_outcomes: Counter[str] = field(default_factory=Counter)
    caption_mistakes: Counter[str] = field(default_factory=Counter)
    # Of each present object's detect answer left empty: the first token's probability of the end and of
    # any `<loc>` (app.demo.evaluate.Answer). Greedy ends there when the end beats the single likeliest
    # bin, even with most of the mass on the bins together.
    empty_first_steps: list[tuple[float, float]] = field(default_factory=list)

    def add_exact(self, task: str, answer: str, expected: str) -> None:
        self.exact.setdefault(task, []).append(answer.strip() == expected)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.detect_ious:
            ious = np.array(self.detect_ious)
            out["detect_found"] = round(float((ious >= FOUND_IOU).mean()), 4)
            out["detect_mean_iou"] = round(float(ious.mean()), 4)
        if self.edge_errors:
            x, y = np.median(np.array(self.edge_errors), axis=0)
            out["detect_x_error_px"], out["detect_y_error_px"] = round(float(x), 1), round(float(y), 1)
        objects = self.detect_outcomes.total()
        for outcome in ("empty", "other_object", "loose") if objects else ():
            out[f"detect_missed_{outcome}"] = round(self.detect_outcomes[outcome] / objects, 4)
        if self.empty_first_steps:
            ends, locs = np.array(self.empty_first_steps).T
            out["detect_empty_median_end"] = round(float(np.median(ends)), 4)
            out["detect_empty_median_loc"] = round(float(np.median(locs)), 4)
            out["detect_empty_loc_above_end"] = round(float((locs > ends).mean()), 4)
        if self.caption_mistakes:
            captions = self.caption_mistakes.total()
            out["caption_wrong_order"] = round(self.caption_mistakes["order"] / captions, 4)
        if self.mask_ious:
            out["segment_mean_mask_iou"] = round(float(np.mean(self.mask_ious)), 4)
        for task, hits in sorted(self.exact.items()):
            out[f"{task}_exact"] = round(float(np.mean(hits)), 4)
        return out
