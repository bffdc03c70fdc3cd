"""Putting a decoded 64x64 mask into its box on the image, and COCO run-length encoding (numpy + pycocotools).

big_vision's segmentation evaluator (`big_vision/evaluators/proj/paligemma/transfers/segmentation.py`,
`Evaluator.run`) places a mask like this:

    bbox = tokens[:, :4] / 1023                                   # loc bins -> [0, 1]
    y1, x1, y2, x2 = map(int, (y1 * h, x1 * w, y2 * h, x2 * w))   # h, w: original image size
    if not valid or x2 <= x1 or y2 <= y1: no mask
    mi = PIL.Image.fromarray(m64).resize([x2 - x1, y2 - y1], resample=PIL.Image.BILINEAR)
    mi = np.asarray(mi) > 0.0                                     # compared with gt[y1:y2, x1:x2]

So the resize is Pillow's, not `jax.image.resize`: a float32 ("F" mode) image resampled with Pillow's
BILINEAR filter, which is a triangle filter of support 1 when enlarging and, when shrinking, the same
triangle widened by the scale factor (an antialiasing filter, like `antialias=True`). `_pillow_resize`
re-implements Pillow's `Resample.c` for float32 images operation by operation (same coefficients, same
double-precision sequential sums, float32 rounding between the horizontal and the vertical pass), so it
matches `PIL.Image.resize` bit for bit: checked against Pillow 12.3 (horizontal pass first, as every
Pillow up to 12 and so big_vision's runs) and against Pillow 13 with its pass order (`vertical_first`).
Pillow 13 alone runs the vertical pass first when the height shrinks much more than the width; that
changes float32 rounding by ~1 ulp, so the thresholded mask can differ only at values within ~1e-7 of 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

BoxXYXY = tuple[float, float, float, float]

# Boxes come from loc tokens and so lie in [0, 1]; a little beyond is accepted (the mask is cropped at the
# image border), but far-off boxes would only cost memory for pixels that are then thrown away.
_BOX_LIMITS = (-1.0, 2.0)
_ROWS_PER_CHUNK_ELEMENTS = 1 << 21  # bounds the float64 scratch of the vertical pass to ~16 MB


def normalize_loc_bins(y1: int, x1: int, y2: int, x2: int) -> BoxXYXY:
    """PaliGemma's `<locY1><locX1><locY2><locX2>` bins (0..1023) -> (x_min, y_min, x_max, y_max) in [0, 1].

    Divides by 1023, the inverse of big_vision's `round(x * 1023)` encoding, in float64 exactly as
    big_vision does, so that `place_mask` reproduces big_vision's integer pixel box bit for bit.
    """
    return (x1 / 1023, y1 / 1023, x2 / 1023, y2 / 1023)


def pixel_box(box_normalized: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """big_vision's pixel bounds (x1, y1, x2, y2): `int(v * size)`, i.e. truncation toward zero (floor for
    boxes inside the image), with no rounding and no clipping; end-exclusive."""
    x_min, y_min, x_max, y_max = (float(v) for v in box_normalized)
    y1, x1, y2, x2 = (int(v) for v in (y_min * height, x_min * width, y_max * height, x_max * width))
    return x1, y1, x2, y2


def place_mask(mask_logits: np.ndarray, box_normalized: BoxXYXY, width: int, height: int) -> np.ndarray:
    """big_vision's placement of a decoded mask: a bool (height, width) array, True inside the object.

    - `box_normalized` is (x_min, y_min, x_max, y_max) as fractions of the image (see `normalize_loc_bins`);
      `width`/`height` are the ORIGINAL image's size, since PaliGemma's boxes are relative to the image.
    - Pixel box: `x1 = int(x_min * width)`, `y1 = int(y_min * height)`, `x2 = int(x_max * width)`,
      `y2 = int(y_max * height)` (truncation, exactly big_vision's `map(int, ...)`), end-exclusive.
      If `x2 <= x1` or `y2 <= y1` (a box under one pixel, or an inverted one) the mask is all False,
      as big_vision counts it invalid.
    - The (64, 64) map, as float32, is resized to (y2 - y1, x2 - x1) with Pillow's BILINEAR resampling
      (bit-identical re-implementation, see the module docstring), thresholded at > 0.0 and pasted at
      [y1:y2, x1:x2] into an all-False image-sized mask.
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
    # Only the part of the box that lies on the image is computed; each output pixel depends only on
    # its own coordinates, so cropping before resampling gives the same pixels as cropping after.
    vx1, vy1, vx2, vy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if vx2 <= vx1 or vy2 <= vy1:
        return full
    resized = _pillow_resize(logits, x2 - x1, y2 - y1, cols=(vx1 - x1, vx2 - x1), rows=(vy1 - y1, vy2 - y1))
    full[vy1:vy2, vx1:vx2] = resized > 0.0
    return full


def _bilinear_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` for the BILINEAR filter over the whole input (box 0..in_size).

    Returns (first input index per output, normalised weights (out_size, ksize) with zeros past each
    output's window). Same operations in the same order as the C code, so the doubles are identical.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # BILINEAR's support is 1
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C (int) truncates toward zero
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    inv_filterscale = 1.0 / filterscale
    taps = np.arange(ksize)
    arg = ((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * inv_filterscale
    weights = np.maximum(1.0 - np.abs(arg), 0.0)  # bilinear_filter(x): 1 - |x| for |x| < 1, else 0
    weights[taps[None, :] >= xmax[:, None]] = 0.0
    total = np.zeros(out_size)
    for j in range(ksize):  # sequential, like the C loop (numpy's pairwise sum could differ in the last bit)
        total += weights[:, j]
    nonzero = total != 0.0
    weights[nonzero] /= total[nonzero, None]
    return xmin, weights


def _resample_rows(src: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """out[i, :] = float32(sum_j src[first[i] + j, :] * weights[i, j]), summed in float64 in order j=0..,
    as Pillow's 32bpc passes do; taps past the window have weight 0 and add exactly nothing."""
    out = np.empty((len(first), src.shape[1]), dtype=np.float32)
    rows_per_chunk = max(1, _ROWS_PER_CHUNK_ELEMENTS // max(1, src.shape[1]))
    last = src.shape[0] - 1
    for start in range(0, len(first), rows_per_chunk):
        f = first[start:start + rows_per_chunk]
        w = weights[start:start + rows_per_chunk]
        acc = np.zeros((len(f), src.shape[1]), dtype=np.float64)
        for j in range(w.shape[1]):
            acc += src[np.minimum(f + j, last)].astype(np.float64) * w[:, j, None]
        out[start:start + rows_per_chunk] = acc  # double -> float32, round to nearest like the C cast
    return out


def _pillow_resize(
    image: np.ndarray,
    out_w: int,
    out_h: int,
    *,
    cols: tuple[int, int],
    rows: tuple[int, int],
    vertical_first: bool = False,
) -> np.ndarray:
    """`PIL.Image.fromarray(image).resize((out_w, out_h), BILINEAR)` for a float32 image, returning only
    output rows[0]:rows[1] and columns cols[0]:cols[1].

    Two separable passes with a float32 image in between, as Pillow does. Pillow <= 12 (what big_vision
    ran) always does the horizontal pass first, which is the default here; Pillow 13 does the vertical one
    first when the height shrinks by more than twice as many pixels as the width (`vertical_first`,
    used by the tests to match whichever Pillow is installed). The order changes only the float32 rounding
    of the intermediate image (<= ~1 ulp). Pillow skips a pass whose size does not change; that pass is
    the identity anyway (weights exactly 1 and 0), so it is not special-cased.
    """
    in_h, in_w = image.shape
    xfirst, xweights = _bilinear_coefficients(in_w, out_w)
    yfirst, yweights = _bilinear_coefficients(in_h, out_h)
    xfirst, xweights = xfirst[cols[0]:cols[1]], xweights[cols[0]:cols[1]]
    yfirst, yweights = yfirst[rows[0]:rows[1]], yweights[rows[0]:rows[1]]
    if vertical_first:
        vertical = _resample_rows(image, yfirst, yweights)  # (visible height, in_w)
        return _resample_rows(vertical.T, xfirst, xweights).T
    horizontal = _resample_rows(image.T, xfirst, xweights).T  # (in_h, visible width)
    return _resample_rows(horizontal, yfirst, yweights)


def pillow13_vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow 13's pass-order rule (`ImagingResampleInner`: vertical first when the height shrinks by
    more than twice as many pixels as the width)."""
    return (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a 2-D mask, exactly as `pycocotools.mask.encode` writes it, with `counts`
    decoded to str (JSON-ready): {"size": [h, w], "counts": "..."}. Column-major, as COCO defines it."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D; got shape {mask.shape}")
    # Nonzero is inside: pycocotools itself would misread values other than 0 and 1.
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _coco_rle(rle: dict) -> dict:
    """A pycocotools-ready RLE: compressed counts as bytes; uncompressed (list) counts converted."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def decode_rle(rle: dict) -> np.ndarray:
    """Inverse of `encode_rle`: bool (h, w). Also accepts bytes counts and uncompressed (list) counts.

    Decoded here rather than by `pycocotools.mask.decode`, which emits a numpy 2 DeprecationWarning
    (its `__array__` lacks the `copy` keyword) on every call; the tests check it gives the same masks.
    """
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


def mask_area(rle: dict) -> int:
    """Number of True pixels (pycocotools `area`)."""
    return int(mask_utils.area(_coco_rle(rle)))


def mask_bbox(rle: dict) -> BoxXYXY | None:
    """Tight box (x_min, y_min, x_max, y_max) in pixels, end-exclusive (pycocotools `toBbox` gives
    x, y, w, h); None for an empty mask."""
    coco = _coco_rle(rle)
    if int(mask_utils.area(coco)) == 0:
        return None
    x, y, w, h = (float(v) for v in mask_utils.toBbox(coco))
    return (x, y, x + w, y + h)
