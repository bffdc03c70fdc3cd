"""Annotated images: the uploaded image with every box, label and mask drawn on it, as a PNG.

Drawn with `supervision`'s annotators (the `render` extra), so a picture from the server looks like one
drawn by the Python client's `to_supervision()` or by a user's own supervision pipeline. No HTTP here:
image bytes and the service's results in, PNG bytes out.

The image is decoded again, at full resolution: the service keeps only the model's reduced input, and
boxes and masks are in pixels of the full-size upright image.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from app.images import decode_image
from app.masks.placement import decode_rle
from app.serving.jobs import ObjectResult

MASK_OPACITY = 0.45

# supervision draws with its own NumPy code when OpenCV is absent, and says so once at import. That is
# the intended set-up here (OpenCV is a large optional speed-up, see docs/api.md), not a problem to log.
warnings.filterwarnings("ignore", message=r"OpenCV \(`opencv-python`\) is not installed",
                        category=UserWarning)


def available() -> bool:
    """Whether supervision is installed (`pip install 'paligemma-server[render]'`)."""
    return importlib.util.find_spec("supervision") is not None


def annotate(image: Image.Image, objects: Sequence[ObjectResult]) -> Image.Image:
    """A copy of `image` (the upright upload at full size) with masks, boxes and labels drawn."""
    import supervision as sv

    image = image.convert("RGB")
    if not objects:
        return image.copy()
    width, height = image.size
    labels = [obj.label or "?" for obj in objects]
    names = list(dict.fromkeys(labels))  # one colour per distinct label, in order of appearance
    masks = None
    if any(obj.mask is not None for obj in objects):
        empty = np.zeros((height, width), bool)
        masks = np.stack([decode_rle(obj.mask.rle) if obj.mask is not None else empty for obj in objects])
    detections = sv.Detections(
        xyxy=np.array([_ordered(obj) for obj in objects], dtype=float),
        mask=masks,
        class_id=np.array([names.index(label) for label in labels]),
        data={"class_name": np.array(labels)},
    )
    size = (width, height)
    scene: Any = image.copy()
    if masks is not None:
        scene = sv.MaskAnnotator(opacity=MASK_OPACITY).annotate(scene, detections)
    scene = sv.BoxAnnotator(thickness=sv.calculate_optimal_line_thickness(size)).annotate(scene, detections)
    label_annotator = sv.LabelAnnotator(text_scale=sv.calculate_optimal_text_scale(size),
                                        text_position=sv.Position.TOP_LEFT, smart_position=True)
    return label_annotator.annotate(scene, detections, labels=labels)


def render_png(image_bytes: bytes, objects: Sequence[ObjectResult], max_pixels: int) -> bytes:
    """Decode the upload (as the service did, but at full size), draw the results, encode a PNG."""
    decoded = decode_image(image_bytes, max_pixels=max_pixels)
    buffer = io.BytesIO()
    annotate(decoded.image, objects).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _ordered(obj: ObjectResult) -> tuple[float, float, float, float]:
    # The model can write a box with its corners swapped; draw the rectangle it spans.
    b = obj.box
    return min(b.x_min, b.x_max), min(b.y_min, b.y_max), max(b.x_min, b.x_max), max(b.y_min, b.y_max)
