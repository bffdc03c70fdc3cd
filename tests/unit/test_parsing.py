"""Parsers on PaliGemma output strings, well-formed and not."""

import pytest

from app.tasks.parsing import (
    Box,
    decode_box,
    encode_box,
    parse_objects,
    strip_location_tokens,
)


def loc(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def seg(*codes: int) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


CODES = tuple(range(16))


def test_single_detection_order_is_y_x_y_x():
    out = parse_objects(loc(100, 200, 300, 400) + " cat")
    [obj] = out.objects
    assert obj.label == "cat"
    assert obj.box == Box(200 / 1023, 100 / 1023, 400 / 1023, 300 / 1023)
    assert obj.mask_tokens is None


def test_several_objects_labels_with_spaces_and_punctuation():
    text = (loc(0, 0, 1023, 1023) + " traffic light ; " + loc(10, 20, 30, 40) + " Mr. O'Brien's car (red) ; "
            + loc(5, 6, 7, 8) + " 3-legged stool!")
    labels = [o.label for o in parse_objects(text).objects]
    assert labels == ["traffic light", "Mr. O'Brien's car (red)", "3-legged stool!"]


def test_full_image_box_and_bounds():
    [obj] = parse_objects(loc(0, 0, 1023, 1023) + " all").objects
    assert obj.box == Box(0.0, 0.0, 1.0, 1.0)
    assert obj.box.to_pixels(640, 480) == Box(0.0, 0.0, 640.0, 480.0)


def test_pixels_on_non_square_images():
    box = decode_box([512, 256, 1023, 767])  # y_min, x_min, y_max, x_max
    pixels = box.to_pixels(1000, 300)
    assert pixels.x_min == pytest.approx(256 / 1023 * 1000, abs=0.01)
    assert pixels.y_min == pytest.approx(512 / 1023 * 300, abs=0.01)
    assert pixels.x_max == pytest.approx(767 / 1023 * 1000, abs=0.01)
    assert pixels.y_max == 300.0
    tall = box.to_pixels(300, 1000)
    assert tall.x_max == pytest.approx(767 / 1023 * 300, abs=0.01)
    assert tall.y_min == pytest.approx(512 / 1023 * 1000, abs=0.01)


def test_encode_decode_round_trip():
    for bins in ([0, 0, 1023, 1023], [1, 2, 3, 4], [511, 512, 900, 1000]):
        assert encode_box(decode_box(bins)) == loc(*bins)


def test_whitespace_between_tokens_is_accepted():
    [obj] = parse_objects("<loc0100> <loc0200> <loc0300> <loc0400>  dog ").objects
    assert obj.label == "dog"


def test_missing_separator_between_objects():
    out = parse_objects(loc(1, 2, 3, 4) + " cat" + loc(5, 6, 7, 8) + " dog")
    assert [o.label for o in out.objects] == ["cat", "dog"]


def test_segmentation_output():
    text = loc(100, 200, 600, 700) + seg(*CODES) + " the left cat ; " + loc(0, 0, 10, 10) + seg(*CODES) + " x"
    out = parse_objects(text)
    assert [o.label for o in out.objects] == ["the left cat", "x"]
    assert out.objects[0].mask_tokens == CODES
    assert out.objects[0].mask_problem is None


def test_segmentation_with_too_few_seg_tokens_keeps_the_box_and_says_why():
    [obj] = parse_objects(loc(1, 2, 300, 400) + seg(1, 2, 3) + " cat").objects
    assert obj.mask_tokens == (1, 2, 3)
    assert "expected 16 <seg> tokens" in (obj.mask_problem or "")


def test_seg_index_out_of_range_keeps_the_box_and_says_why():
    [obj] = parse_objects(loc(1, 2, 300, 400) + seg(*CODES[:15], 200) + " cat").objects
    assert "outside 0..127" in (obj.mask_problem or "")


@pytest.mark.parametrize("with_mask", [False, True])
def test_one_rule_for_every_task_drops_empty_or_inverted_boxes_bad_bins_and_missing_labels(with_mask):
    segs = seg(*CODES) if with_mask else ""
    out = parse_objects(loc(300, 400, 300, 500) + segs + " flat ; " + loc(500, 400, 300, 600) + segs
                        + " upside down ; " + loc(1, 2, 3, 4000) + segs + " bad ; " + loc(1, 2, 30, 40) + segs
                        + " ; " + loc(1, 2, 3, 4) + segs + " good")
    assert [o.label for o in out.objects] == ["good"]
    assert out.dropped == 4


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a cat on a mat",
        "<loc0100><loc0200><loc0300>",  # truncated: three locations
        "<loc0100><loc0200",  # truncated inside a token
        "<loc12><loc0200><loc0300><loc0400> x",  # short bin
        "<seg001><seg002> only segs",
        ";;;; ; ;",
        "<loc0100><loc0200><loc0300><loc0400" + "garbage" * 100,
        "\x00\xff<loc>" * 50,
    ],
)
def test_garbage_and_truncated_output_never_raises(text):
    assert parse_objects(text).objects == []
    assert parse_objects(text).objects == []


def test_truncated_second_object_keeps_the_first():
    out = parse_objects(loc(1, 2, 3, 4) + " cat ; <loc0005><loc00")
    assert [o.label for o in out.objects] == ["cat"]


def test_strip_location_tokens_keeps_line_breaks():
    assert strip_location_tokens("<loc0001>STOP\nNO <loc0002> PARKING  ") == "STOP\nNO PARKING"


def test_strip_location_tokens():
    assert strip_location_tokens(loc(1, 2, 3, 4) + seg(*CODES) + " a cat ; " + loc(1, 2, 3, 4) + " dog") == \
        "a cat ; dog"
