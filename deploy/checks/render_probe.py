"""Draws with the server's own renderer where it runs: deploy/check.sh --build pipes this file to
`python -` inside the image, so it imports only the server (app/) and its dependencies.

app/api/render.py (supervision's annotators, the `render` extra) draws a box, its label and a mask on a
plain image, as /v1/detect and /v1/segment do for `Accept: image/png`. Prints the share of pixels that
changed; exits 1 when the extra is missing or nothing was drawn.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image

from app.api import render
from app.masks.placement import encode_rle
from app.serving.jobs import MaskResult, ObjectResult
from app.tasks.parsing import Box

WIDTH, HEIGHT = 320, 240


def drawn_share() -> float:
    """The share of the image's pixels the renderer changed."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (40, 90, 160))
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[60:180, 80:240] = True
    box = Box(80, 60, 240, 180)
    obj = ObjectResult(label="probe", box=box, box_normalized=Box(0.25, 0.25, 0.75, 0.75), mask_tokens=None,
                       mask=MaskResult(rle=encode_rle(mask), area=int(mask.sum()), box=box),
                       mask_problem=None)
    upload = io.BytesIO()
    image.save(upload, format="PNG")
    png = render.render_png(upload.getvalue(), [obj], max_pixels=WIDTH * HEIGHT)
    with Image.open(io.BytesIO(png)) as out:
        drawn = np.asarray(out.convert("RGB"), dtype=int)
    return float((np.abs(drawn - np.asarray(image, dtype=int)).sum(axis=2) > 0).mean())


def main() -> int:
    if not render.available():
        print("the render extra (supervision) is not installed")
        return 1
    share = drawn_share()
    print(f"box, label and mask drawn: {share:.0%} of the pixels changed")
    return 0 if share > 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
