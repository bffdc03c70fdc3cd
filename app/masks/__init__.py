"""Segmentation masks: PaliGemma's VQ-VAE mask decoder (`decoder`, torch) and placing a decoded mask on the
image plus COCO RLE (`placement`, numpy + pycocotools only).

Names are re-exported lazily so that importing `app.masks.placement` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MaskDecoder": "decoder",
    "MaskDecoderError": "decoder",
    "LoadedMaskDecoder": "decoder",
    "load_mask_decoder": "decoder",
    "PUBLISHED_SHA256": "decoder",
    "PUBLISHED_SIZE": "decoder",
    "place_mask": "placement",
    "encode_rle": "placement",
    "decode_rle": "placement",
    "mask_area": "placement",
    "mask_bbox": "placement",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
