"""The demo world: generated scenes of coloured shapes and an optional word (docs/demo.md has the rules).

A scene is 224 x 224 RGB on one light background, with 1 to 3 filled circles, squares or triangles
(apex up) in red, green, blue or yellow (each channel jittered by up to +-20), sides of 40 to 100 px,
bounding squares apart by at least 4 blank pixels, no two objects of the same colour and shape; half the
scenes also hold one black word drawn with Pillow's default font at 20 to 28 px, clear of every object.

Everything here is pure Pillow + numpy and deterministic from a numpy Generator: `generate_scene(rng)`
draws a scene's description, `render(scene)` its pixels, `object_mask(scene, i)` an object's exact pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CANVAS = 224
BACKGROUND_RANGE = (190, 255)
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
}
COLOR_JITTER = 20
SIZE_RANGE = (40, 100)  # side of the bounding square, inclusive
MIN_GAP = 4  # blank pixels between two objects' bounding squares, at least
OBJECT_COUNT = (1, 3)
WORDS = ("CAT", "DOG", "SUN", "MAP", "BOX", "RED", "TREE", "FISH", "BIRD", "STAR", "MOON", "SHIP", "LAMP",
         "KING", "BLUE", "GOLD", "ROSE", "WIND", "FIRE", "SNOW")
FONT_SIZES = (20, 28)  # inclusive
WORD_PROBABILITY = 0.5
WORD_COLOR = (0, 0, 0)
# The word's box stays this far from every object's bounding square.
WORD_MARGIN = 2
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    rgb: tuple[int, int, int]  # the colour as drawn, jitter included
    x: int  # top-left corner of the bounding square; the shape covers pixels x..x+size, y..y+size
    y: int
    size: int

    @property
    def name(self) -> str:
        """How prompts and answers name the object: `red circle`."""
        return f"{self.color} {self.shape}"

    @property
    def square(self) -> tuple[int, int, int, int]:
        """The bounding square as Pillow draws it: (x0, y0, x1, y1), both ends inclusive."""
        return (self.x, self.y, self.x + self.size, self.y + self.size)


@dataclass(frozen=True)
class Word:
    text: str
    font_size: int
    x: int  # where Pillow's `text()` anchors it (top-left of the line)
    y: int
    box: tuple[int, int, int, int]  # its ink's box (x0, y0, x1, y1), end-exclusive, from `textbbox`


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    word: Word | None


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    shift = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + shift, 0, 255))  # type: ignore[return-value]


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Whether two inclusive boxes have at least `gap` blank pixels between them on some axis."""
    return (a[2] + gap < b[0] or b[2] + gap < a[0]) or (a[3] + gap < b[1] or b[3] + gap < a[1])


def _place_objects(rng: np.random.Generator, count: int) -> list[SceneObject] | None:
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(kinds), size=count, replace=False)
    objects: list[SceneObject] = []
    for index in chosen:
        color, shape = kinds[int(index)]
        size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        for _ in range(_PLACEMENT_TRIES):
            # The square's far edge (x + size) stays on the canvas.
            x = int(rng.integers(0, CANVAS - size))
            y = int(rng.integers(0, CANVAS - size))
            square = (x, y, x + size, y + size)
            if all(_apart(square, other.square, MIN_GAP) for other in objects):
                break
        else:
            return None
        objects.append(SceneObject(shape, color, _jittered(COLORS[color], rng), x, y, size))
    return objects


def _place_word(rng: np.random.Generator, objects: list[SceneObject]) -> Word | None:
    text = WORDS[int(rng.integers(len(WORDS)))]
    size = int(rng.integers(FONT_SIZES[0], FONT_SIZES[1] + 1))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = (int(v) for v in draw.textbbox((0, 0), text, font=font(size)))
    for _ in range(_PLACEMENT_TRIES):
        x = int(rng.integers(-left, CANVAS - right + 1))
        y = int(rng.integers(-top, CANVAS - bottom + 1))
        box = (x + left, y + top, x + right, y + bottom)
        inclusive = (box[0], box[1], box[2] - 1, box[3] - 1)
        if all(_apart(inclusive, o.square, WORD_MARGIN) for o in objects):
            return Word(text, size, x, y, box)
    return None


def generate_scene(rng: np.random.Generator, most_objects: int = OBJECT_COUNT[1],
                   word_probability: float = WORD_PROBABILITY) -> Scene:
    """One scene drawn from the rules; placements that do not fit are drawn again from the same stream.
    `most_objects` below 3 draws from the easier part of the world only (the start of training);
    `word_probability` other than the world's is for the vision tower's own phase (app.demo.train)."""
    with_word = bool(rng.random() < word_probability)
    while True:
        background = tuple(int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, 3))
        objects = _place_objects(rng, int(rng.integers(OBJECT_COUNT[0], most_objects + 1)))
        if objects is None:
            continue
        word = _place_word(rng, objects) if with_word else None
        if with_word and word is None:
            continue
        return Scene(background, tuple(objects), word)  # type: ignore[arg-type]


def scene_rng(stream: int, seed: int, index: int) -> np.random.Generator:
    """The generator of scene `index` of a seeded stream: scenes are independent of how many came before,
    and the streams (training, export, playground) never share a scene."""
    return np.random.default_rng([stream, seed, index])


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: int | tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = obj.square
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # apex up: (x + s/2, y), (x, y + s), (x + s, y + s)
        draw.polygon([(obj.x + obj.size / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, obj.rgb)
    if scene.word is not None:
        draw.text((scene.word.x, scene.word.y), scene.word.text, font=font(scene.word.font_size),
                  fill=WORD_COLOR)
    return image


def object_mask(obj: SceneObject) -> np.ndarray:
    """The pixels the object covers on the 224 x 224 canvas (bool, height x width)."""
    image = Image.new("L", (CANVAS, CANVAS), 0)
    _draw_shape(ImageDraw.Draw(image), obj, 255)
    return np.asarray(image) > 0


def tight_box(obj: SceneObject) -> tuple[int, int, int, int]:
    """The box of the object's pixels (x_min, y_min, x_max, y_max), end-exclusive, on the canvas.
    Every shape covers its whole bounding square's extent, so this is the square plus its last pixel."""
    return (obj.x, obj.y, obj.x + obj.size + 1, obj.y + obj.size + 1)


def patch_sums(values: np.ndarray, grid: int) -> np.ndarray:
    """Sums of a canvas-sized array over the patches of a `grid` x `grid` layout, row-major as the vision
    tower orders its image tokens."""
    cell = CANVAS // grid
    return values.reshape(grid, cell, grid, cell).sum(axis=(1, 3)).reshape(-1)
