"""Parsed objects + mask logits -> results in the uploaded image's pixels (runs off the worker thread)."""

from __future__ import annotations

import numpy as np

from app.masks.placement import encode_rle, mask_area, mask_bbox, place_mask
from app.serving.finishing import FinishedOutput
from app.serving.jobs import MaskResult, ObjectResult
from app.tasks.parsing import Box, ParsedObject

NO_DECODER = "no mask decoder is loaded (set PALIGEMMA_MASK_DECODER)"


def object_results(output: FinishedOutput, width: int, height: int,
                   masks_enabled: bool) -> list[ObjectResult]:
    assert output.parsed is not None
    return [
        object_result(obj, logits, width, height, masks_enabled)
        for obj, logits in zip(output.parsed.objects, output.mask_logits, strict=True)
    ]


def object_result(obj: ParsedObject, logits: np.ndarray | None, width: int, height: int,
                  masks_enabled: bool) -> ObjectResult:
    mask = None
    problem = obj.mask_problem
    if logits is not None:
        b = obj.box
        rle = encode_rle(place_mask(logits, (b.x_min, b.y_min, b.x_max, b.y_max), width, height))
        bbox = mask_bbox(rle)
        mask = MaskResult(rle, mask_area(rle), Box(*bbox) if bbox else None)
    elif problem is None and obj.mask_tokens is not None and not masks_enabled:
        problem = NO_DECODER
    return ObjectResult(
        label=obj.label,
        box=obj.box.to_pixels(width, height),
        box_normalized=obj.box,
        mask_tokens=obj.mask_tokens,
        mask=mask,
        mask_problem=problem,
    )
