"""Running one batch of prepared requests through `generate`. Called only from the worker thread.

Requests in a batch share one left-padded `generate` call (left padding keeps greedy outputs identical
to running each request alone). Each request keeps its own `max_new_tokens`: a per-row stopping
criterion retires rows that reached their own limit, and the call ends when every row is done.

Image features are computed here, once per distinct image in the batch, and handed to `generate` ready
(`mm_encoder_outputs`); with a feature cache, an image seen recently is not encoded again at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from app.model.features import FeatureCache
from app.model.loader import LoadedModel


@dataclass(frozen=True)
class ModelInput:
    input_ids: list[int]
    pixel_values: torch.Tensor  # (3, H, W) float32 on the CPU, already normalised
    max_new_tokens: int
    image_key: str | None = None  # identifies the image's content, for the feature cache


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens, without the final <eos>
    prompt_tokens: int
    completion_tokens: int  # tokens computed for this request, <eos> included
    finished: bool  # ended with <eos> (False: cut by max_new_tokens)
    cached_features: bool = False  # the image was not encoded again


class _PerRowLimit(StoppingCriteria):
    """Marks row i done once it generated `limits[i]` tokens."""

    def __init__(self, limits: torch.Tensor, prompt_length: int):
        self.limits = limits
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        return generated >= self.limits  # type: ignore[return-value]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, feature_cache_size: int = 0):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.eos = set(loaded.eos_token_ids)
        self.cache = FeatureCache(feature_cache_size)

    def _to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with work already queued on the GPU.
            return tensor.pin_memory().to(self.device, dtype, non_blocking=True)
        return tensor.to(self.device, dtype)

    def _collate(self, inputs: list[ModelInput]) -> dict[str, torch.Tensor]:
        length = max(len(item.input_ids) for item in inputs)
        input_ids = torch.full((len(inputs), length), self.loaded.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(inputs), length), dtype=torch.long)
        for row, item in enumerate(inputs):
            input_ids[row, length - len(item.input_ids):] = torch.tensor(item.input_ids, dtype=torch.long)
            attention_mask[row, length - len(item.input_ids):] = 1
        return {
            "input_ids": self._to_device(input_ids),
            "attention_mask": self._to_device(attention_mask),
            # Zero everywhere in the prompt: image and prefix attend to each other bidirectionally.
            "token_type_ids": self._to_device(torch.zeros_like(input_ids)),
        }

    def _image_features(self, inputs: list[ModelInput]) -> tuple[torch.Tensor, list[bool]]:
        """(batch, image tokens, hidden) features; each distinct uncached image is encoded once."""
        found: dict[str | int, torch.Tensor] = {}
        hits = []
        for item in inputs:
            cached = self.cache.get(item.image_key)
            hits.append(cached is not None)
            if cached is not None and item.image_key is not None:
                found[item.image_key] = cached
        to_encode: dict[str | int, torch.Tensor] = {}
        for index, item in enumerate(inputs):
            key = item.image_key if item.image_key is not None else index
            if key not in found and key not in to_encode:
                to_encode[key] = item.pixel_values
        if to_encode:
            pixels = self._to_device(torch.stack(list(to_encode.values())), self.loaded.dtype)
            encoded = self.model.get_image_features(pixels).pooler_output
            for key, features in zip(to_encode, encoded, strict=True):
                found[key] = features
                if isinstance(key, str):
                    self.cache.put(key, features)
        rows = [found[item.image_key if item.image_key is not None else index]
                for index, item in enumerate(inputs)]
        return torch.stack(rows), hits

    def _split(self, row: list[int], limit: int) -> tuple[list[int], int, bool]:
        tokens = row[:limit]
        for position, token in enumerate(tokens):
            if token in self.eos:
                return tokens[:position], position + 1, True
        return tokens, len(tokens), False

    @torch.inference_mode()
    def generate(self, inputs: list[ModelInput]) -> list[Generation]:
        batch = self._collate(inputs)
        features, hits = self._image_features(inputs)
        prompt_length = batch["input_ids"].shape[1]
        limits = torch.tensor([item.max_new_tokens for item in inputs], device=self.device)
        output = self.model.generate(
            **batch,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
            max_new_tokens=max(item.max_new_tokens for item in inputs),
            do_sample=False,
            num_beams=1,
            stopping_criteria=StoppingCriteriaList([_PerRowLimit(limits, prompt_length)]),
            pad_token_id=self.loaded.pad_token_id,
            eos_token_id=list(self.eos),
        )
        new_tokens = output[:, prompt_length:].tolist()
        results = []
        for item, row, hit in zip(inputs, new_tokens, hits, strict=True):
            tokens, computed, finished = self._split(row, item.max_new_tokens)
            results.append(Generation(tokens, len(item.input_ids), computed, finished, hit))
        return results
