"""The request mix every system is measured on: real photographs, four tasks, fixed output lengths.

Photographs come from scikit-image's bundled data (public domain, shipped inside the wheel: no download).
They are JPEG-encoded at their own sizes, plus one upscaled to about 12 megapixels (what a phone uploads).

Realism of repeats: users ask several questions about one image, but a service sees many different
images. So the mix is a sequence of *sessions* (one image, one to four questions, sent back to back),
and every round of sessions uses a fresh *variant* of each photo (shifted by a few pixels, so bytes and
pixels differ). Repeats therefore occur within a session only, and a server-side image cache gets the
hits real traffic would give it, not a free ride on a workload of nine images.

Output lengths are fixed per task (`MAX_NEW_TOKENS`). The benchmark presets have random weights and
never emit <eos>, so every request generates exactly its `max_new_tokens` on every system; the load
generator checks the servers' reported `completion_tokens` to make sure.
"""

from __future__ import annotations

import io
import random
import secrets
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image

TASKS = ("caption", "vqa", "detect", "segment")
MAX_NEW_TOKENS = {"caption": 16, "vqa": 16, "detect": 32, "segment": 32}
JPEG_QUALITY = 90
TWELVE_MP = (4240, 2832)  # 12.0 megapixels, 3:2 like most phone cameras

# skimage.data loader name -> (photo key, target size or None for the original size).
_PHOTOS: dict[str, tuple[str, tuple[int, int] | None]] = {
    "astronaut": ("astronaut", None),  # 512 x 512
    "coffee": ("coffee", None),  # 600 x 400
    "coffee_12mp": ("coffee", TWELVE_MP),
    "chelsea": ("chelsea", None),  # 451 x 300
    "rocket": ("rocket", None),  # 640 x 427
    "immunohistochemistry": ("immunohistochemistry", None),  # 512 x 512
    "camera": ("camera", None),  # 512 x 512, greyscale
    "retina": ("retina", None),  # 1411 x 1411
    "hubble_deep_field": ("hubble_deep_field", None),  # 1000 x 872
}

# Sessions: one image and the questions a user asks about it, in order. (task, fields)
_SESSIONS: dict[str, list[tuple[str, dict[str, str]]]] = {
    "astronaut": [("caption", {}), ("vqa", {"question": "what is the person wearing?"}),
                  ("detect", {"objects": "person ; flag"}), ("segment", {"objects": "person"})],
    "coffee_12mp": [("caption", {}), ("vqa", {"question": "what is in the cup?"}),
                    ("detect", {"objects": "cup ; spoon"})],
    "coffee": [("segment", {"objects": "cup"})],
    "chelsea": [("caption", {}), ("vqa", {"question": "what animal is this?"}),
                ("segment", {"objects": "cat"})],
    "rocket": [("caption", {}), ("detect", {"objects": "rocket"}),
               ("vqa", {"question": "is it day or night?"})],
    "immunohistochemistry": [("caption", {}), ("segment", {"objects": "cell"})],
    "camera": [("caption", {}), ("vqa", {"question": "what is the man holding?"}),
               ("detect", {"objects": "camera ; person"})],
    "retina": [("caption", {}), ("detect", {"objects": "optic disc"})],
    "hubble_deep_field": [("vqa", {"question": "how many galaxies are there?"}), ("caption", {})],
}


@dataclass(frozen=True)
class Request:
    """One request of the mix: what to send, and what the model computes for it."""

    task: str
    image_key: str  # photo name and variant, e.g. "coffee_12mp#3"
    jpeg: bytes
    width: int
    height: int
    fields: dict[str, str]  # form fields besides `image` and `max_new_tokens`
    max_new_tokens: int
    # The same request as one multipart body, built once so the load generator spends no CPU on it.
    body: bytes = field(repr=False, default=b"")
    content_type: str = ""

    @property
    def prefix(self) -> str:
        """The PaliGemma prefix every system builds from these fields (see app.tasks.prompts)."""
        return build_prefix(self.task, self.fields)

    @property
    def path(self) -> str:
        return f"/v1/{self.task}"


def build_prefix(task: str, fields: dict[str, str]) -> str:
    language = fields.get("language", "en")
    if task == "caption":
        return f"caption {language}"
    if task == "vqa":
        return f"answer {language} {' '.join(fields['question'].split())}"
    if task in ("detect", "segment"):
        objects = [o.strip() for o in fields["objects"].split(";") if o.strip()]
        return f"{task} " + " ; ".join(objects)
    raise ValueError(f"unknown task {task!r}")


@cache
def _photo(loader: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, loader)()
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    # Photos with an alpha band would be flattened differently by each system; none is used, but be sure.
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image


def _variant(key: str, variant: int) -> Image.Image:
    """The photo at its benchmark size, shifted by `variant` pixels (variant 0: the photo itself)."""
    loader, size = _PHOTOS[key]
    image = _photo(loader)
    if size is not None:
        image = _upscaled(loader, size)
    if variant:
        # Crop a few pixels off the top-left: different pixels and bytes, the same picture and size class.
        shift = 2 * variant
        image = image.crop((shift, shift, image.width, image.height))
    return image


@cache
def _upscaled(loader: str, size: tuple[int, int]) -> Image.Image:
    return _photo(loader).resize(size, Image.Resampling.LANCZOS)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body (as curl -F would send it) and its Content-Type."""
    boundary = "bench" + secrets.token_hex(12)
    parts = []
    for name, value in fields.items():
        header = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{header}{value}\r\n".encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def build_mix(variants: int = 16, seed: int = 0, tokens: dict[str, int] | None = None) -> list[Request]:
    """The request sequence: `variants` rounds, each with every session once, in a seeded order.

    The load generator cycles through it; the ceiling runs it in consecutive batches. With 16 variants
    the sequence is 16 x 23 = 368 requests over 144 distinct JPEGs. `tokens` overrides MAX_NEW_TOKENS.
    """
    tokens_for = {**MAX_NEW_TOKENS, **(tokens or {})}
    rng = random.Random(seed)
    requests: list[Request] = []
    for variant in range(variants):
        order = list(_SESSIONS)
        rng.shuffle(order)
        for key in order:
            image = _variant(key, variant)
            jpeg = encode_jpeg(image)
            for task, extra in _SESSIONS[key]:
                tokens = tokens_for[task]
                form = {**extra, "max_new_tokens": str(tokens)}
                body, content_type = multipart(form, jpeg)
                requests.append(Request(task, f"{key}#{variant}", jpeg, image.width, image.height,
                                        dict(extra), tokens, body, content_type))
    return requests


def describe_mix(requests: list[Request]) -> dict[str, object]:
    """Counts for the report: tasks, distinct images, sizes, bytes."""
    tasks = {t: sum(r.task == t for r in requests) for t in TASKS}
    images = {r.image_key: r for r in requests}
    sizes = sorted({(key.split("#")[0], r.width, r.height, len(r.jpeg)) for key, r in images.items()
                    if key.endswith("#0")})
    return {
        "requests": len(requests),
        "tasks": tasks,
        "distinct_images": len(images),
        "photos": [{"name": n, "width": w, "height": h, "jpeg_bytes": b} for n, w, h, b in sizes],
        "max_new_tokens": dict(MAX_NEW_TOKENS),
        "mean_new_tokens": sum(r.max_new_tokens for r in requests) / len(requests),
    }
