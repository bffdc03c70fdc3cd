"""Results -> `supervision` (the `supervision` extra): `sv.Detections`, masks, and annotated images.

It reads results through the small protocols below rather than importing `models`, whose
`to_supervision()` methods call into here: so neither module needs the other to load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import supervision as sv
    from PIL import Image


# Read-only members (properties), so the pydantic models match them whatever their fields' exact types.
class _Box(Protocol):
    @property
    def x_min(self) -> float: ...
    @property
    def y_min(self) -> float: ...
    @property
    def x_max(self) -> float: ...
    @property
    def y_max(self) -> float: ...


class _Located(Protocol):
    """A detection or a segment (`models.Detection`, `models.Segment`: a segment also has `mask`)."""

    @property
    def label(self) -> str: ...
    @property
    def box(self) -> _Box: ...


class _RLE(Protocol):
    @property
    def size(self) -> list[int]: ...
    @property
    def counts(self) -> str: ...


class _ImageSize(Protocol):
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


class _Drawable(Protocol):
    """A result that can hold boxes (`models.DetectResponse`, `SegmentResponse`, `GenerateResponse`)."""

    @property
    def image(self) -> _ImageSize: ...
    def to_supervision(self) -> sv.Detections: ...


INSTALL_HINT = "pip install 'paligemma-client[supervision]'"
MASK_OPACITY = 0.45  # as the server's annotated PNGs and the playground


def _supervision() -> Any:
    try:
        import warnings

        # Without OpenCV, supervision draws with its own NumPy code and says so at import; that is fine here.
        warnings.filterwarnings("ignore", message=r"OpenCV \(`opencv-python`\) is not installed",
                                category=UserWarning)
        import supervision
    except ImportError as exc:
        raise ImportError(f"this needs the supervision package: {INSTALL_HINT}") from exc
    return supervision


def decode_rle(rle: _RLE) -> np.ndarray:
    """A COCO compressed RLE (as pycocotools writes it) -> a boolean (height, width) array."""
    import numpy as np

    height, width = rle.size
    runs = _runs(rle.counts)
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE counts cover {sum(runs)} pixels; a {height}x{width} mask needs "
                         f"{height * width}")
    # Runs alternate unset, set, unset... over the pixels in column-major order (COCO's layout).
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(width, height).T.copy()


def _runs(counts: str) -> list[int]:
    # The same decoder as the server's app.masks.placement.decode_rle, copied: the client must install
    # without the server (torch). Both are tested against pycocotools.
    # pycocotools' rleFrString: 5-bit groups offset by 48, 0x20 "more follows", 0x10 in the last group the
    # sign; from the third number on, each is a difference to the number two before it.
    runs: list[int] = []
    data = counts.encode("ascii")
    p = 0
    while p < len(data):
        x = k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("RLE counts end in the middle of a number")
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


def to_detections(objects: Sequence[_Located], image: _ImageSize) -> sv.Detections:
    """`sv.Detections` with xyxy in pixels, `class_id` one per distinct label (in order of appearance),
    labels in `data["class_name"]`, and masks when any object is a segment with a mask."""
    import numpy as np

    sv = _supervision()
    labels = [obj.label for obj in objects]
    names = list(dict.fromkeys(labels))
    xyxy = np.array([[o.box.x_min, o.box.y_min, o.box.x_max, o.box.y_max] for o in objects], dtype=float)
    masks: list[_RLE | None] = [getattr(obj, "mask", None) for obj in objects]  # detections have none
    mask = None
    if any(rle is not None for rle in masks):
        mask = np.zeros((len(objects), image.height, image.width), dtype=bool)
        for i, rle in enumerate(masks):
            if rle is not None:
                mask[i] = decode_rle(rle)
    return sv.Detections(
        xyxy=xyxy.reshape(len(objects), 4),
        mask=mask,
        class_id=np.array([names.index(label) for label in labels], dtype=int),
        data={"class_name": np.array(labels, dtype=str)},
    )


def annotate(image: Image.Image, detections: sv.Detections) -> Image.Image:
    """A copy of `image` with masks, boxes and labels drawn, the way the server draws its PNGs."""
    sv = _supervision()
    scene: Any = image.convert("RGB")
    if len(detections) == 0:
        return scene
    size = scene.size
    if detections.mask is not None:
        scene = sv.MaskAnnotator(opacity=MASK_OPACITY).annotate(scene, detections)
    scene = sv.BoxAnnotator(thickness=sv.calculate_optimal_line_thickness(size)).annotate(scene, detections)
    labels = [str(name) for name in detections.data["class_name"]]
    label_annotator = sv.LabelAnnotator(text_scale=sv.calculate_optimal_text_scale(size),
                                        text_position=sv.Position.TOP_LEFT, smart_position=True)
    return label_annotator.annotate(scene, detections, labels=labels)


def draw_file(image_path: str | Path, result: _Drawable, out_path: str | Path) -> None:
    """Draw `result` over the image it was computed on and save a PNG. The image is turned upright by its
    EXIF orientation first, as the server did before measuring boxes."""
    from PIL import Image, ImageOps

    with Image.open(image_path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    size = (result.image.width, result.image.height)
    if image.size != size:  # not the file the server saw upright: fit it to the result's pixels
        image = image.resize(size)
    annotate(image, result.to_supervision()).save(out_path, format="PNG")
