"""What a client sends in place of an image file: base64 or a data URL (a stand-in until URL support)."""

from __future__ import annotations

import base64
import binascii

from app.errors import InvalidImage, PayloadTooLarge
from app.settings import Settings


async def load_image(value: str, settings: Settings) -> bytes:
    text = value.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise InvalidImage("a data URL image must be base64 (data:image/png;base64,...)")
    limit = settings.max_image_bytes
    if len(text) * 3 // 4 > limit + 3:
        raise PayloadTooLarge(f"the image is over {limit} bytes (PALIGEMMA_MAX_IMAGE_BYTES)", param="image")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("`image` must be a file field, base64, a data URL or an allowed http(s) "
                           "URL") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"the image is over {limit} bytes (PALIGEMMA_MAX_IMAGE_BYTES)", param="image")
    return data
