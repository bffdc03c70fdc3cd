"""Turning a decoded image and a task prefix into model inputs, outside the model worker.

This reproduces what `PaliGemmaProcessor` does for one (image, text) pair, read from the checkpoint's own
processor config, but split so that the expensive half (image resizing) runs in parallel threads and the
worker only stacks ready tensors. A test checks the result equals the processor's output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import PaliGemmaProcessor

from app.errors import InvalidRequest


@dataclass(frozen=True)
class ImageTransform:
    """Squash to height x width, resample, rescale, normalise: the checkpoint's preprocessing."""

    height: int
    width: int
    resample: Image.Resampling
    rescale_factor: float
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_processor(cls, processor: PaliGemmaProcessor) -> ImageTransform:
        ip = processor.image_processor
        size = ip.size
        height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        resample = ip.resample if ip.resample is not None else Image.Resampling.BICUBIC
        return cls(
            height=int(height),
            width=int(width),
            resample=Image.Resampling(int(resample)),
            rescale_factor=float(ip.rescale_factor),
            mean=np.asarray(ip.image_mean, dtype=np.float32).reshape(3, 1, 1),
            std=np.asarray(ip.image_std, dtype=np.float32).reshape(3, 1, 1),
        )

    @property
    def min_side(self) -> int:
        return min(self.height, self.width)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize((self.width, self.height), resample=self.resample)
        array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) * self.rescale_factor
        return torch.from_numpy((array - self.mean) / self.std)


@dataclass(frozen=True)
class PromptEncoder:
    """`<image>` x N, `<bos>`, the prefix, `\\n`: the layout PaliGemma was trained on."""

    image_token_id: int
    image_seq_length: int
    bos_token_id: int
    processor: PaliGemmaProcessor

    @classmethod
    def from_processor(cls, processor: PaliGemmaProcessor) -> PromptEncoder:
        tokenizer = processor.tokenizer
        return cls(
            image_token_id=int(processor.image_token_id),
            image_seq_length=int(processor.image_seq_length),
            # PaliGemma 2 tokenizers do not add <bos> themselves: we always put it in explicitly.
            bos_token_id=int(tokenizer.bos_token_id),
            processor=processor,
        )

    @functools.cached_property
    def control_tokens(self) -> list[str]:
        """Tokens a prompt must not spell out: the tokenizer would read them as control, not text."""
        tokenizer = self.processor.tokenizer
        return sorted({*tokenizer.all_special_tokens, str(self.processor.image_token)}, key=len, reverse=True)

    def encode(self, prefix: str) -> list[int]:
        """The model input for `prefix`; InvalidRequest if the prefix spells a control token."""
        for token in self.control_tokens:
            if token in prefix:
                raise InvalidRequest(
                    f"the prompt must not contain {token}: the server adds the image tokens and <bos> itself "
                    "and ends the prefix; send only the task text, e.g. `caption en`")
        text_ids = self.processor.tokenizer(prefix + "\n", add_special_tokens=False)["input_ids"]
        return [self.image_token_id] * self.image_seq_length + [self.bos_token_id, *text_ids]

    def decode(self, token_ids: list[int]) -> str:
        # skip_special_tokens drops <eos>/<pad> but keeps <loc>/<seg>, which are ordinary added tokens.
        return self.processor.tokenizer.decode(
            token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
