"""The request mix every system is measured on: real photographs, four tasks, fixed output lengths.

Photographs come from scikit-image's bundled data (public domain, shipped inside the wheel: no download).
They are JPEG-encoded at their own sizes, plus one upscaled to about 12 megapixels (what a phone uploads).

Realism of repeats: users ask several questions about one image, but a service sees many different
images. So the mix is a sequence of *sessions* (one image, one to four questions, sent back to back),
and every round of sessions uses a fresh *variant* of each photo (shifted by a few pixels, so bytes and
pixels differ). Repeats therefore occur within a session only, and a server-side image cache gets the
hits real traffic would give it, not a free ride on a workload of nine images.

Output lengths are fixed per task (`MAX_NEW_TOKENS`), or spread over a range per request
(`spread_new_tokens`, for mixed-length runs). The benchmark presets have random weights and never emit
<eos>, so every request generates exactly its `max_new_tokens` on every system; the load generator
checks the servers' reported `completion_tokens` to make sure.

Without scikit-image (it comes with benchmarks/requirements.txt, not with the project), `photos=
"synthetic"` builds the same sequence from seeded synthetic pictures of the same sizes: enough to check
a benchmark's code paths (`benchmarks.gpu --dry-run` in the tests), not what a published number uses.
"""

from __future__ import annotations

import dataclasses
import io
import random
import secrets
from collections.abc import Sequence
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
# The bundled photos' sizes (width, height) and modes, for synthetic stand-ins.
_SIZES: dict[str, tuple[tuple[int, int], str]] = {
    "astronaut": ((512, 512), "RGB"), "coffee": ((600, 400), "RGB"), "chelsea": ((451, 300), "RGB"),
    "rocket": ((640, 427), "RGB"), "immunohistochemistry": ((512, 512), "RGB"), "camera": ((512, 512), "L"),
    "retina": ((1411, 1411), "RGB"), "hubble_deep_field": ((1000, 872), "RGB"),
}
PHOTO_SOURCES = ("skimage", "synthetic")

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


def skimage_available() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _photo(loader: str, source: str = "skimage") -> Image.Image:
    if source == "synthetic":
        return _synthetic(loader)
    import skimage.data

    array = getattr(skimage.data, loader)()
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    # Photos with an alpha band would be flattened differently by each system; none is used, but be sure.
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image


def _synthetic(loader: str) -> Image.Image:
    """A seeded picture of the photo's size and mode: smooth gradients plus noise."""
    (width, height), mode = _SIZES[loader]
    rng = np.random.default_rng(sum(map(ord, loader)))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = 1 if mode == "L" else 3
    planes = [127 + 100 * np.sin(x / rng.uniform(20, 80) + y / rng.uniform(20, 80) + c)
              for c in range(channels)]
    array = np.stack(planes, axis=-1) + rng.normal(0, 12, (height, width, channels))
    array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array[..., 0] if mode == "L" else array)


def _variant(key: str, variant: int, source: str = "skimage") -> Image.Image:
    """The photo at its benchmark size, shifted by `variant` pixels (variant 0: the photo itself)."""
    loader, size = _PHOTOS[key]
    image = _photo(loader, source)
    if size is not None:
        image = _upscaled(loader, size, source)
    if variant:
        # Crop a few pixels off the top-left: different pixels and bytes, the same picture and size class.
        shift = 2 * variant
        image = image.crop((shift, shift, image.width, image.height))
    return image


@cache
def _upscaled(loader: str, size: tuple[int, int], source: str = "skimage") -> Image.Image:
    return _photo(loader, source).resize(size, Image.Resampling.LANCZOS)


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


def build_mix(variants: int = 16, seed: int = 0, tokens: dict[str, int] | None = None,
              photos: str = "skimage") -> list[Request]:
    """The request sequence: `variants` rounds, each with every session once, in a seeded order.

    The load generator cycles through it; the in-process ceiling takes requests from it in the same
    order. With 16 variants the sequence is 16 x 23 = 368 requests over 144 distinct JPEGs. `tokens`
    overrides MAX_NEW_TOKENS; `photos` is one of PHOTO_SOURCES.
    """
    if photos not in PHOTO_SOURCES:
        raise ValueError(f"photos must be one of {PHOTO_SOURCES}; got {photos!r}")
    tokens_for = {**MAX_NEW_TOKENS, **(tokens or {})}
    rng = random.Random(seed)
    requests: list[Request] = []
    for variant in range(variants):
        order = list(_SESSIONS)
        rng.shuffle(order)
        for key in order:
            image = _variant(key, variant, photos)
            jpeg = encode_jpeg(image)
            for task, extra in _SESSIONS[key]:
                requests.append(_with_tokens(Request(task, f"{key}#{variant}", jpeg, image.width,
                                                     image.height, dict(extra), 0), tokens_for[task]))
    return requests


def _with_tokens(request: Request, tokens: int) -> Request:
    body, content_type = multipart({**request.fields, "max_new_tokens": str(tokens)}, request.jpeg)
    return dataclasses.replace(request, max_new_tokens=tokens, body=body, content_type=content_type)


def spread_new_tokens(mix: list[Request], lengths: Sequence[int]) -> list[Request]:
    """The same sequence with max_new_tokens cycling through `lengths`, request by request (a
    mixed-length workload: short and long requests interleaved, every length equally often)."""
    return [_with_tokens(request, lengths[i % len(lengths)]) for i, request in enumerate(mix)]


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
        "max_new_tokens": {t: sorted({r.max_new_tokens for r in requests if r.task == t}) for t in TASKS},
        "mean_new_tokens": sum(r.max_new_tokens for r in requests) / len(requests),
    }
