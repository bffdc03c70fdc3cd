"""Putting a decoded 64x64 mask into its box on the image, and COCO run-length encoding.

big_vision's segmentation evaluator (`big_vision/evaluators/proj/paligemma/transfers/segmentation.py`,
`Evaluator.run`) places a mask like this:

    bbox = tokens[:, :4] / 1023                                   # loc bins -> [0, 1]
    y1, x1, y2, x2 = map(int, (y1 * h, x1 * w, y2 * h, x2 * w))   # h, w: original image size
    if not valid or x2 <= x1 or y2 <= y1: no mask
    mi = PIL.Image.fromarray(m64).resize([x2 - x1, y2 - y1], resample=PIL.Image.BILINEAR)
    mi = np.asarray(mi) > 0.0                                     # compared with gt[y1:y2, x1:x2]

`place_mask` does exactly that, with Pillow itself: a float32 ("F" mode) image resampled with Pillow's
BILINEAR filter (a triangle filter of support 1 when enlarging, widened by the scale factor when
shrinking, like `antialias=True`). The loc bins are decoded by `app.tasks.parsing.decode_box`, the one
place that divides by 1023. Pillow 13 runs its vertical pass first when the height shrinks much more
than the width, where Pillow <= 12 (what big_vision ran) always ran the horizontal one first; that
changes float32 rounding by ~1 ulp, so a thresholded pixel can differ from big_vision's only where the
map is within ~1e-7 of 0 (tests/unit/masks/test_mask_placement.py pins both facts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

BoxXYXY = tuple[float, float, float, float]
# COCO run-length encoding: {"size": [h, w], "counts": str (compressed), bytes, or a list of runs}.
RLE = dict[str, Any]

# Boxes come from loc tokens and so lie in [0, 1]; a little beyond is accepted (the mask is cropped at the
# image border), but far-off boxes would only cost memory for pixels that are then thrown away.
_BOX_LIMITS = (-1.0, 2.0)


def pixel_box(box_normalized: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """big_vision's pixel bounds (x1, y1, x2, y2): `int(v * size)`, i.e. truncation toward zero (floor for
    boxes inside the image), with no rounding and no clipping; end-exclusive."""
    x_min, y_min, x_max, y_max = (float(v) for v in box_normalized)
    y1, x1, y2, x2 = (int(v) for v in (y_min * height, x_min * width, y_max * height, x_max * width))
    return x1, y1, x2, y2


def place_mask(mask_logits: np.ndarray, box_normalized: BoxXYXY, width: int, height: int) -> np.ndarray:
    """big_vision's placement of a decoded mask: a bool (height, width) array, True inside the object.

    - `box_normalized` is (x_min, y_min, x_max, y_max) as fractions of the image (`decode_box` of the loc
      bins); `width`/`height` are the ORIGINAL image's size, since PaliGemma's boxes are relative to it.
    - Pixel box: `x1 = int(x_min * width)`, `y1 = int(y_min * height)`, `x2 = int(x_max * width)`,
      `y2 = int(y_max * height)` (truncation, exactly big_vision's `map(int, ...)`), end-exclusive.
      If `x2 <= x1` or `y2 <= y1` (a box under one pixel, or an inverted one) the mask is all False,
      as big_vision counts it invalid.
    - The (64, 64) map, as float32, is resized to (y2 - y1, x2 - x1) by Pillow (BILINEAR), thresholded
      at > 0.0 and pasted at [y1:y2, x1:x2] into an all-False image-sized mask.
    - Boxes reaching past the image (coordinates outside [0, 1], which loc tokens cannot express): the
      mask is resized to the whole pixel box and only the part on the image is kept (big_vision cannot
      place such boxes at all). Coordinates outside [-1, 2] or non-finite raise ValueError.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive; got {width}x{height}")
    values = [float(v) for v in box_normalized]
    low, high = _BOX_LIMITS
    if len(values) != 4 or not all(math.isfinite(v) and low <= v <= high for v in values):
        raise ValueError(f"box must be 4 finite fractions of the image within {_BOX_LIMITS}; got {values}")
    logits = np.asarray(mask_logits, dtype=np.float32)  # what PIL.Image.fromarray(m64) holds ("F" mode)
    if logits.ndim != 2 or 0 in logits.shape:
        raise ValueError(f"mask_logits must be a non-empty 2-D map; got shape {logits.shape}")
    full = np.zeros((height, width), dtype=bool)
    x1, y1, x2, y2 = pixel_box(values, width, height)
    if x2 <= x1 or y2 <= y1:
        return full
    vx1, vy1, vx2, vy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if vx2 <= vx1 or vy2 <= vy1:
        return full
    # Resized whole, then cropped: resizing only the visible part with Pillow's `box=` argument moves the
    # sample points (measured: values off by up to 4e-5, flipping pixels). Only boxes past the image,
    # which loc tokens cannot express, pay for pixels that are then cropped away.
    resized = resize_bilinear(logits, x2 - x1, y2 - y1)
    full[vy1:vy2, vx1:vx2] = resized[vy1 - y1:vy2 - y1, vx1 - x1:vx2 - x1] > 0.0
    return full


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`PIL.Image.fromarray(image, "F").resize((width, height), BILINEAR)` as a float32 (height, width)
    array: what big_vision does to a decoded map."""
    resized = Image.fromarray(np.asarray(image, dtype=np.float32), "F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized)


def encode_rle(mask: np.ndarray) -> RLE:
    """COCO compressed RLE of a 2-D mask, exactly as `pycocotools.mask.encode` writes it, with `counts`
    decoded to str (JSON-ready): {"size": [h, w], "counts": "..."}. Column-major, as COCO defines it."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D; got shape {mask.shape}")
    # Nonzero is inside: pycocotools itself would misread values other than 0 and 1.
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _coco_rle(rle: RLE) -> dict[str, Any]:
    """A pycocotools-ready RLE: compressed counts as bytes; uncompressed (list) counts converted."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        converted: dict[str, Any] = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        return converted
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def decode_rle(rle: RLE) -> np.ndarray:
    """Inverse of `encode_rle`: bool (h, w). Also accepts bytes counts and uncompressed (list) counts.

    Malformed counts (too few or too many pixels, negative runs, a cut-off string) raise ValueError.
    """
    # Not `pycocotools.mask.decode`: it returns uninitialised memory for counts that cover fewer than
    # h * w pixels and warns on every call under numpy 2 (tests/unit/masks/test_mask_placement.py pins both).
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = list(counts) if isinstance(counts, list) else _counts_from_string(counts)
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise ValueError(f"RLE counts cover {sum(runs)} pixels (or are negative); size {h}x{w} needs {h * w}")
    # Runs alternate 0, 1, 0, ... over the pixels in column-major order (COCO's definition).
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(w, h).T.copy()


def _counts_from_string(counts: str | bytes) -> list[int]:
    """COCO's compressed counts string -> run lengths (maskApi.c `rleFrString`): each number in 5-bit
    groups offset by 48, 0x20 meaning "more groups follow", 0x10 in the last group the sign, and from
    the third number on stored as a difference to the number two before it."""
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("RLE counts string ends in the middle of a number")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def mask_area(rle: RLE) -> int:
    """Number of True pixels (pycocotools `area`)."""
    return int(mask_utils.area(_coco_rle(rle)))


def mask_bbox(rle: RLE) -> BoxXYXY | None:
    """Tight box (x_min, y_min, x_max, y_max) in pixels, end-exclusive (pycocotools `toBbox` gives
    x, y, w, h); None for an empty mask."""
    coco = _coco_rle(rle)
    if int(mask_utils.area(coco)) == 0:
        return None
    x, y, w, h = (float(v) for v in mask_utils.toBbox(coco))
    return (x, y, x + w, y + h)
