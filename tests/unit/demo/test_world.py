"""The scene generator follows the demo world's rules (docs/demo.md)."""

from itertools import combinations

import numpy as np
import pytest
from PIL import ImageDraw

from app.demo import world
from app.demo.world import (
    CANVAS,
    COLOR_JITTER,
    COLORS,
    SIZE_RANGE,
    WORDS,
    Scene,
    generate_scene,
    object_mask,
    render,
    scene_rng,
    tight_box,
)

SCENES = [generate_scene(scene_rng(99, 0, i)) for i in range(400)]


def _pixel_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_counts_sizes_and_placement_are_within_the_rules():
    counts = {len(s.objects) for s in SCENES}
    assert counts == {1, 2, 3}
    for scene in SCENES:
        assert all(190 <= c <= 255 for c in scene.background)
        for obj in scene.objects:
            assert SIZE_RANGE[0] <= obj.size <= SIZE_RANGE[1]
            x0, y0, x1, y1 = tight_box(obj)
            assert x0 >= 0 and y0 >= 0 and x1 <= CANVAS and y1 <= CANVAS
    sizes = [obj.size for s in SCENES for obj in s.objects]
    assert min(sizes) <= SIZE_RANGE[0] + 3 and max(sizes) >= SIZE_RANGE[1] - 3  # the whole range is drawn


def test_objects_keep_four_blank_pixels_apart_and_never_repeat_colour_and_shape():
    for scene in SCENES:
        names = [obj.name for obj in scene.objects]
        assert len(names) == len(set(names))
        for a, b in combinations(scene.objects, 2):
            ax0, ay0, ax1, ay1 = tight_box(a)
            bx0, by0, bx1, by1 = tight_box(b)
            gap_x = max(bx0 - ax1, ax0 - bx1)  # blank pixels between them along x (negative: overlap)
            gap_y = max(by0 - ay1, ay0 - by1)
            assert max(gap_x, gap_y) >= 4, (a, b)


def test_colours_are_the_named_ones_within_the_jitter():
    for scene in SCENES:
        for obj in scene.objects:
            assert all(abs(v - base) <= COLOR_JITTER for v, base in zip(obj.rgb, COLORS[obj.color], strict=True))


def test_half_the_scenes_hold_a_word_clear_of_every_object():
    with_word = [s for s in SCENES if s.word is not None]
    assert 0.4 < len(with_word) / len(SCENES) < 0.6
    for scene in with_word:
        word = scene.word
        assert word.text in WORDS and 20 <= word.font_size <= 28
        x0, y0, x1, y1 = word.box
        assert x0 >= 0 and y0 >= 0 and x1 <= CANVAS and y1 <= CANVAS
        # The box is where the ink is, and it touches no object's pixels.
        ink = np.asarray(render(Scene(scene.background, (), word)).convert("L")) < 128
        assert ink.any() and not ink[:y0].any() and not ink[y1:].any()
        assert not ink[:, :x0].any() and not ink[:, x1:].any()
        for obj in scene.objects:
            assert not (object_mask(obj)[y0:y1, x0:x1]).any()


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_the_share_of_scenes_with_a_word_can_be_set_for_the_vision_towers_phase(probability):
    scenes = [generate_scene(scene_rng(99, 0, i), word_probability=probability) for i in range(50)]
    assert all((scene.word is not None) == bool(probability) for scene in scenes)


def test_the_word_box_is_pillows_textbbox_for_its_font():
    scene = next(s for s in SCENES if s.word is not None)
    draw = ImageDraw.Draw(render(scene))
    assert draw.textbbox((scene.word.x, scene.word.y), scene.word.text,
                         font=world.font(scene.word.font_size)) == scene.word.box


@pytest.mark.parametrize("shape", world.SHAPES)
def test_tight_box_is_the_box_of_the_drawn_pixels(shape):
    for size in range(SIZE_RANGE[0], SIZE_RANGE[1] + 1):
        obj = world.SceneObject(shape, "red", COLORS["red"], 7, 11, size)
        assert _pixel_box(object_mask(obj)) == tight_box(obj)


def test_rendered_pixels_are_the_object_colours_on_the_background():
    scene = next(s for s in SCENES if len(s.objects) == 3 and s.word is None)
    pixels = np.asarray(render(scene))
    covered = np.zeros((CANVAS, CANVAS), dtype=bool)
    for obj in scene.objects:
        mask = object_mask(obj)
        assert (pixels[mask] == obj.rgb).all()
        covered |= mask
    assert (pixels[~covered] == scene.background).all()


def test_triangles_point_up():
    obj = world.SceneObject("triangle", "red", COLORS["red"], 20, 20, 60)
    mask = object_mask(obj)
    widths = mask.sum(axis=1)
    assert widths[20] < 5 and widths[80] == 61  # a point at the top, the full side at the bottom


def test_scenes_are_the_same_for_the_same_seed_and_differ_across_streams():
    assert generate_scene(scene_rng(1, 5, 3)) == generate_scene(scene_rng(1, 5, 3))
    assert generate_scene(scene_rng(1, 5, 3)) != generate_scene(scene_rng(2, 5, 3))
