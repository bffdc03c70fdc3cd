"""Mask placement against big_vision's own code path (Pillow) and against the numpy re-implementation it
replaced, and COCO RLE through pycocotools."""

from __future__ import annotations

import contextlib
import json
from dataclasses import astuple

import numpy as np
import PIL
import PIL.Image
import pytest
from pycocotools import mask as mask_utils

from app.masks.placement import (
    decode_rle,
    encode_rle,
    mask_area,
    mask_bbox,
    pixel_box,
    place_mask,
    resize_bilinear,
)
from app.tasks.parsing import decode_box
from tests.unit.masks import resize_reference as reference

INSTALLED_PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def loc_box(y1: int, x1: int, y2: int, x2: int) -> tuple[float, float, float, float]:
    """PaliGemma's loc bins as the normalised (x_min, y_min, x_max, y_max) box `place_mask` takes."""
    return astuple(decode_box([y1, x1, y2, x2]))


def _pil_resize(m64: np.ndarray, width: int, height: int) -> np.ndarray:
    image = PIL.Image.fromarray(m64.astype(np.float32))  # mode "F", as big_vision's float32 map
    return np.asarray(image.resize((width, height), PIL.Image.Resampling.BILINEAR))


def big_vision_place(m64: np.ndarray, box: tuple[float, float, float, float], width: int, height: int):
    """big_vision's evaluator placement (segmentation.py, Evaluator.run), with the paste its IoU implies.
    Returns the bool mask and the float values it thresholded (for telling rounding-level ties)."""
    x_min, y_min, x_max, y_max = box
    y1, x1, y2, x2 = map(int, (y_min * height, x_min * width, y_max * height, x_max * width))
    full = np.zeros((height, width), bool)
    values = np.full((height, width), np.inf, np.float32)
    if x2 <= x1 or y2 <= y1:
        return full, values
    mi = _pil_resize(m64, x2 - x1, y2 - y1)
    full[y1:y2, x1:x2] = mi > 0.0
    values[y1:y2, x1:x2] = mi
    return full, values


def _assert_same_as_big_vision(m64, box, width, height) -> np.ndarray:
    expected, values = big_vision_place(m64, box, width, height)
    got = place_mask(m64, box, width, height)
    assert got.shape == (height, width) and got.dtype == bool
    # Pillow 13 may run its two passes in the other order (see the placement module docstring): the float32
    # maps then differ by ~1 ulp, which can only flip a value that is itself within rounding of 0.
    differ = got != expected
    assert not differ.any() or np.abs(values[differ]).max() < 1e-6, f"{differ.sum()} pixels differ"
    return got


def _random_logits(rng: np.random.Generator) -> np.ndarray:
    # Smooth blobs like a decoded mask (a random field would make every pixel a near-tie).
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    field = sum(rng.normal() * np.cos(rng.uniform(0, 6) * xx + rng.uniform(0, 6) * yy + rng.uniform(0, 6))
                for _ in range(6))
    return field.astype(np.float32)


@pytest.mark.parametrize(("width", "height"), [(640, 360), (300, 900), (37, 23), (1, 1), (2000, 1500)])
def test_random_boxes_match_big_vision(width: int, height: int) -> None:
    rng = np.random.default_rng(width * 7 + height)
    for _ in range(25):
        bins = np.sort(rng.integers(0, 1024, size=(2, 2)), axis=0)  # (y1, x1) <= (y2, x2) per axis
        box = loc_box(int(bins[0, 0]), int(bins[0, 1]), int(bins[1, 0]), int(bins[1, 1]))
        _assert_same_as_big_vision(_random_logits(rng), box, width, height)


@pytest.mark.parametrize(("width", "height"), [(640, 360), (300, 900)])
def test_box_touching_every_border_fills_the_image_frame(width: int, height: int) -> None:
    m64 = _random_logits(np.random.default_rng(1))
    got = _assert_same_as_big_vision(m64, loc_box(0, 0, 1023, 1023), width, height)
    assert pixel_box((0.0, 0.0, 1.0, 1.0), width, height) == (0, 0, width, height)
    assert np.array_equal(got, _pil_resize(m64, width, height) > 0)


def test_boxes_touching_single_borders() -> None:
    rng = np.random.default_rng(2)
    for bins in [(0, 100, 500, 1023), (600, 0, 1023, 400), (0, 0, 10, 1023), (1013, 1013, 1023, 1023)]:
        _assert_same_as_big_vision(_random_logits(rng), loc_box(*bins), 640, 360)


def test_box_overflowing_the_image_is_cropped_not_squeezed() -> None:
    m64 = _random_logits(np.random.default_rng(3))
    width, height = 640, 360
    box = (-0.25, 0.5, 1.25, 1.5)  # loc tokens cannot say this; callers with their own boxes might
    x1, y1, x2, y2 = pixel_box(box, width, height)
    assert (x1, y1, x2, y2) == (-160, 180, 800, 540)
    whole = _pil_resize(m64, x2 - x1, y2 - y1) > 0  # the mask over its whole box, then cut at the image
    got = place_mask(m64, box, width, height)
    assert np.array_equal(got[y1:, :], whole[: height - y1, -x1 : -x1 + width])
    assert not got[:y1].any()


def test_box_entirely_off_the_image_is_empty() -> None:
    assert not place_mask(np.ones((64, 64), np.float32), (1.1, 0.0, 1.5, 1.0), 100, 100).any()
    assert not place_mask(np.ones((64, 64), np.float32), (-0.9, -0.9, -0.1, 1.0), 100, 100).any()


def test_tiny_boxes() -> None:
    m64 = np.ones((64, 64), np.float32)
    width, height = 640, 360
    # One pixel wide and high: x 320..321, y 180..181.
    one = (320.2 / width, 180.5 / height, 321.7 / width, 181.9 / height)
    assert pixel_box(one, width, height) == (320, 180, 321, 181)
    got = _assert_same_as_big_vision(m64, one, width, height)
    assert got.sum() == 1 and got[180, 320]
    # Under one pixel after truncation, zero-size, and inverted boxes: all False, no exception.
    for box in [(320.2 / width, 0.2, 320.9 / width, 0.8), (0.5, 0.5, 0.5, 0.5), (0.1, 0.3, 0.9, 0.3),
                (0.9, 0.1, 0.1, 0.9)]:
        got = place_mask(m64, box, width, height)
        assert got.shape == (height, width) and not got.any()
        assert not big_vision_place(m64, box, width, height)[0].any()
    # Adjacent loc bins on a small image can collapse to 0 px as well.
    assert not place_mask(m64, loc_box(500, 500, 501, 501), 100, 100).any()


def test_pixel_box_copies_big_vision_float_truncation() -> None:
    # 279 / 1023 * 55 is exactly 15 in rationals but 14.999999999999998 in float64; big_vision's int()
    # gives 14, and so must we (a rational floor would give 15).
    assert pixel_box(loc_box(0, 279, 1023, 1023), 55, 10)[0] == 14
    for width in (55, 93, 640, 300, 1920):
        for t in range(1024):
            assert pixel_box(loc_box(t, t, 1023, 1023), width, width)[:2] == (
                int(np.float64(t) / 1023 * width),) * 2


def test_reference_resize_is_bit_identical_to_installed_pillow() -> None:
    # Keeps the reference below honest: it is Pillow's algorithm, in either pass order.
    rng = np.random.default_rng(4)
    sizes = [(1, 1), (2, 130), (130, 2), (64, 64), (63, 65), (640, 20), (20, 640), (200, 40), (7, 900)]
    sizes.append((1500, 1100))
    sizes += [(int(rng.integers(1, 400)), int(rng.integers(1, 400))) for _ in range(60)]
    for out_w, out_h in sizes:
        m64 = (rng.standard_normal((64, 64)) * 3).astype(np.float32)
        vertical_first = INSTALLED_PILLOW_13 and reference.pillow13_vertical_first(64, 64, out_w, out_h)
        got = reference.numpy_resize(m64, out_w, out_h, vertical_first=vertical_first)
        assert np.array_equal(got, _pil_resize(m64, out_w, out_h)), (out_w, out_h)


# Full-image boxes of common photo sizes, and small, thin, one-pixel and degenerate ones.
REPLACED_SIZES = [(200, 150), (1500, 1000), (4000, 3000), (1, 1), (1, 7), (7, 1), (2, 130), (130, 2),
                  (63, 65), (64, 64), (640, 20), (20, 640), (7, 900), (3, 3)]


@pytest.mark.parametrize(("out_w", "out_h"), REPLACED_SIZES)
def test_resize_equals_the_numpy_implementation_it_replaced(out_w: int, out_h: int) -> None:
    m64 = (np.random.default_rng(out_w * 31 + out_h).standard_normal((64, 64)) * 3).astype(np.float32)
    got = resize_bilinear(m64, out_w, out_h)
    assert got.shape == (out_h, out_w) and got.dtype == np.float32
    vertical_first = INSTALLED_PILLOW_13 and reference.pillow13_vertical_first(64, 64, out_w, out_h)
    assert np.array_equal(got, reference.numpy_resize(m64, out_w, out_h, vertical_first=vertical_first))


def _boxes_of_every_kind(rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    boxes = [loc_box(0, 0, 1023, 1023), loc_box(100, 50, 700, 900), loc_box(500, 500, 501, 501),
             loc_box(0, 279, 1023, 1023), loc_box(1013, 1013, 1023, 1023)]
    boxes += [(0.5, 0.5, 0.5, 0.5), (0.1, 0.3, 0.9, 0.3), (0.9, 0.1, 0.1, 0.9)]  # empty and inverted
    boxes += [(0.5, 0.5, 0.5004, 0.5004), (0.2, 0.2, 0.2001, 0.9)]  # under one pixel on big images
    boxes += [(-0.25, 0.5, 1.25, 1.5), (-0.9, -0.9, -0.1, 1.0), (1.1, 0.0, 1.5, 1.0)]  # past the image
    for _ in range(12):
        bins = np.sort(rng.integers(0, 1024, size=(2, 2)), axis=0)
        boxes.append(loc_box(int(bins[0, 0]), int(bins[0, 1]), int(bins[1, 0]), int(bins[1, 1])))
    return boxes


@pytest.mark.parametrize(("width", "height"), [(200, 150), (1500, 1000), (4000, 3000), (37, 23), (1, 1)])
def test_placed_masks_equal_the_implementation_they_replaced(width: int, height: int) -> None:
    rng = np.random.default_rng(width + height)
    for box in _boxes_of_every_kind(rng):
        m64 = _random_logits(rng)
        got = place_mask(m64, box, width, height)
        # Bit for bit against the old code run in the installed Pillow's pass order...
        same_order = reference.place_mask(m64, box, width, height, pillow13_order=INSTALLED_PILLOW_13)
        assert np.array_equal(got, same_order), box
        # ...and against what it returned (Pillow <= 12's order) up to ties within rounding of 0.
        old = reference.place_mask(m64, box, width, height)
        differ = got != old
        if differ.any():
            x1, y1, x2, y2 = pixel_box(box, width, height)
            values = resize_bilinear(m64, x2 - x1, y2 - y1)
            ys, xs = np.nonzero(differ)
            assert np.abs(values[ys - y1, xs - x1]).max() < 1e-6, f"{differ.sum()} pixels differ for {box}"


def test_resize_shrinks_with_an_antialiasing_filter() -> None:
    # Pillow's BILINEAR widens its triangle by the scale factor when shrinking: a 1-px checkerboard
    # averages out to ~0, where point-sampled bilinear would keep +-1 values.
    checker = np.where((np.add.outer(np.arange(64), np.arange(64)) % 2) == 0, 1.0, -1.0).astype(np.float32)
    small = resize_bilinear(checker, 16, 16)
    assert np.abs(small).max() < 0.2


def test_invalid_arguments() -> None:
    m64 = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="image size"):
        place_mask(m64, (0, 0, 1, 1), 0, 10)
    with pytest.raises(ValueError, match="finite"):
        place_mask(m64, (0, 0, float("nan"), 1), 10, 10)
    with pytest.raises(ValueError, match="within"):
        place_mask(m64, (0, 0, 5.0, 1), 10, 10)
    with pytest.raises(ValueError, match="4 finite"):
        place_mask(m64, (0, 0, 1), 10, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        place_mask(np.zeros(64, np.float32), (0, 0, 1, 1), 10, 10)


# ---------------------------------------------------------------------------------------------------- RLE


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    masks = [rng.random((h, w)) < p for h, w, p in [(360, 640, 0.3), (900, 300, 0.01), (5, 7, 0.5)]]
    masks += [np.zeros((360, 640), bool), np.ones((17, 3), bool)]
    single = np.zeros((40, 30), bool)
    single[39, 0] = True  # bottom-left corner: wrong row/column order would put it elsewhere
    masks.append(single)
    placed = place_mask(_random_logits(rng), loc_box(100, 50, 700, 900), 640, 360)
    masks.append(placed)
    return masks


# pycocotools' own decode warns under numpy 2 (its __array__ lacks `copy`); it is only the reference here.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_rle_round_trip_and_pycocotools_agreement() -> None:
    for mask in _masks():
        rle = encode_rle(mask)
        assert rle["size"] == list(mask.shape)
        assert isinstance(rle["counts"], str)
        json.dumps(rle)  # ready for a JSON response
        # Exactly what pycocotools writes for the Fortran-ordered mask.
        reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle["counts"].encode() == reference["counts"]
        back = decode_rle(rle)
        assert back.dtype == bool and np.array_equal(back, mask)
        assert np.array_equal(mask_utils.decode(reference).astype(bool), back)
        assert mask_area(rle) == int(mask.sum())


def test_rle_accepts_c_and_fortran_ordered_and_non_bool_input() -> None:
    mask = np.zeros((6, 9), bool)
    mask[1:3, 2:8] = True
    flipped_twice = mask[:, ::-1][:, ::-1]  # a non-contiguous view
    as_255 = mask.astype(np.uint8) * 255  # any nonzero value is "inside"
    for variant in (mask, np.asfortranarray(mask), as_255, mask.astype(np.float32), flipped_twice):
        assert encode_rle(variant) == encode_rle(mask)
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.zeros((2, 2, 2), bool))


def test_decode_accepts_bytes_and_uncompressed_counts() -> None:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    rle = encode_rle(mask)
    assert np.array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    # Uncompressed COCO RLE: run lengths over the column-major pixels, starting with a run of zeros.
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]])) if flat.any() else np.array([len(flat)])
    counts = np.diff(np.r_[0, changes]).tolist()
    assert sum(counts) == mask.size
    assert np.array_equal(decode_rle({"size": [4, 5], "counts": counts}), mask)


def test_malformed_rle_is_refused() -> None:
    rle = encode_rle(np.eye(5, dtype=bool))
    with pytest.raises(ValueError, match="size 5x6 needs 30"):
        decode_rle({"size": [5, 6], "counts": rle["counts"]})
    with pytest.raises(ValueError, match="ends in the middle"):
        decode_rle({"size": [5, 5], "counts": "a"})  # 'a' - 48 has the "more follows" bit set
    with pytest.raises(ValueError, match="negative"):
        decode_rle({"size": [1, 1], "counts": [2, -1]})


def test_why_decode_rle_is_not_pycocotools_decode() -> None:
    """Pins the two facts behind keeping `decode_rle`: if this fails, pycocotools has changed and
    `pycocotools.mask.decode` may now do the job."""
    rle = mask_utils.encode(np.asfortranarray(np.eye(5, dtype=np.uint8)))
    short = {"size": [5, 6], "counts": rle["counts"]}  # counts for 25 pixels, a 30-pixel mask
    numpy_2 = int(np.__version__.split(".")[0]) >= 2
    warns = pytest.warns(DeprecationWarning, match="copy keyword") if numpy_2 else contextlib.nullcontext()
    with warns:  # on every call under numpy 2
        garbage = mask_utils.decode(short)  # no error: 5 pixels of whatever the buffer held
    assert garbage.shape == (5, 6)
    with pytest.raises(ValueError, match="size 5x6 needs 30"):
        decode_rle(short)


def test_area_and_bbox_agree_with_numpy() -> None:
    for mask in _masks():
        rle = encode_rle(mask)
        assert mask_area(rle) == int(mask.sum())
        box = mask_bbox(rle)
        assert mask_area({"size": rle["size"], "counts": rle["counts"].encode()}) == int(mask.sum())
        if not mask.any():
            assert box is None
            continue
        ys, xs = np.nonzero(mask)
        assert box == (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
