"""The numpy re-implementation of Pillow's float32 BILINEAR resize that `app.masks.placement` used before
it called Pillow itself; kept only as the reference that the Pillow path is held to (and that
`python -m benchmarks.placement` times). No pytest import: the benchmark loads it too.

It re-implements Pillow's `Resample.c` for "F" images operation by operation (same coefficients, same
double-precision sequential sums, float32 rounding between the horizontal and the vertical pass), and
computes only the requested output rows and columns.
"""

from __future__ import annotations

import math

import numpy as np

_ROWS_PER_CHUNK_ELEMENTS = 1 << 21  # bounds the float64 scratch of a pass to ~16 MB


def _bilinear_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` for the BILINEAR filter over the whole input (box 0..in_size):
    (first input index per output, normalised weights (out_size, ksize), zero past each window)."""
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
    """out[i, :] = float32(sum_j src[first[i] + j, :] * weights[i, j]), summed in float64 in order j=0..."""
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


def numpy_resize(
    image: np.ndarray,
    out_w: int,
    out_h: int,
    *,
    cols: tuple[int, int] | None = None,
    rows: tuple[int, int] | None = None,
    vertical_first: bool = False,
) -> np.ndarray:
    """`PIL.Image.fromarray(image, "F").resize((out_w, out_h), BILINEAR)`, only output rows[0]:rows[1] and
    columns cols[0]:cols[1]. Horizontal pass first (Pillow <= 12), or vertical first (`vertical_first`,
    Pillow 13's order for strongly shrunk heights, see `pillow13_vertical_first`)."""
    cols = cols or (0, out_w)
    rows = rows or (0, out_h)
    in_h, in_w = image.shape
    xfirst, xweights = _bilinear_coefficients(in_w, out_w)
    yfirst, yweights = _bilinear_coefficients(in_h, out_h)
    xfirst, xweights = xfirst[cols[0]:cols[1]], xweights[cols[0]:cols[1]]
    yfirst, yweights = yfirst[rows[0]:rows[1]], yweights[rows[0]:rows[1]]
    if vertical_first:
        vertical = _resample_rows(image, yfirst, yweights)
        return _resample_rows(vertical.T, xfirst, xweights).T
    horizontal = _resample_rows(image.T, xfirst, xweights).T
    return _resample_rows(horizontal, yfirst, yweights)


def pillow13_vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow 13's pass-order rule (`ImagingResampleInner`: vertical first when the height shrinks by
    more than twice as many pixels as the width)."""
    return (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2


def place_mask(
    mask_logits: np.ndarray, box: tuple[float, float, float, float], width: int, height: int,
    *, pillow13_order: bool = False,
) -> np.ndarray:
    """The replaced `place_mask` (validation left out): big_vision's pixel box, the visible part of the
    resized map computed alone, thresholded at 0; passes in Pillow <= 12's order unless `pillow13_order`."""
    logits = np.asarray(mask_logits, dtype=np.float32)
    full = np.zeros((height, width), dtype=bool)
    x_min, y_min, x_max, y_max = box
    y1, x1, y2, x2 = (int(v) for v in (y_min * height, x_min * width, y_max * height, x_max * width))
    if x2 <= x1 or y2 <= y1:
        return full
    vx1, vy1, vx2, vy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if vx2 <= vx1 or vy2 <= vy1:
        return full
    in_h, in_w = logits.shape
    order = pillow13_order and pillow13_vertical_first(in_w, in_h, x2 - x1, y2 - y1)
    resized = numpy_resize(logits, x2 - x1, y2 - y1, cols=(vx1 - x1, vx2 - x1), rows=(vy1 - y1, vy2 - y1),
                           vertical_first=order)
    full[vy1:vy2, vx1:vx2] = resized > 0.0
    return full
