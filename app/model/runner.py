"""Running one batch of prepared requests through `generate`. Called only from the worker thread.

Requests in a batch share one left-padded `generate` call (left padding keeps greedy outputs identical
to running each request alone). Each request keeps its own `max_new_tokens`: a per-row stopping
criterion retires rows that reached their own limit, and the call ends when every row is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from app.model.loader import LoadedModel


@dataclass(frozen=True)
class ModelInput:
    input_ids: list[int]
    pixel_values: torch.Tensor  # (3, H, W) float32 on the CPU, already normalised
    max_new_tokens: int


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens, without the final <eos>
    prompt_tokens: int
    completion_tokens: int  # tokens computed for this request, <eos> included
    finished: bool  # ended with <eos> (False: cut by max_new_tokens)


class _PerRowLimit(StoppingCriteria):
    """Marks row i done once it generated `limits[i]` tokens."""

    def __init__(self, limits: torch.Tensor, prompt_length: int):
        self.limits = limits
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        return generated >= self.limits  # type: ignore[return-value]


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.eos = set(loaded.eos_token_ids)

    def _collate(self, inputs: list[ModelInput]) -> dict[str, torch.Tensor]:
        length = max(len(item.input_ids) for item in inputs)
        input_ids = torch.full((len(inputs), length), self.loaded.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(inputs), length), dtype=torch.long)
        for row, item in enumerate(inputs):
            input_ids[row, length - len(item.input_ids):] = torch.tensor(item.input_ids, dtype=torch.long)
            attention_mask[row, length - len(item.input_ids):] = 1
        pixel_values = torch.stack([item.pixel_values for item in inputs])
        pin = self.device.type == "cuda"
        if pin:
            pixel_values = pixel_values.pin_memory()
        return {
            "input_ids": input_ids.to(self.device, non_blocking=pin),
            "attention_mask": attention_mask.to(self.device, non_blocking=pin),
            # Zero everywhere in the prompt: image and prefix attend to each other bidirectionally.
            "token_type_ids": torch.zeros_like(input_ids).to(self.device, non_blocking=pin),
            "pixel_values": pixel_values.to(self.device, self.loaded.dtype, non_blocking=pin),
        }

    def _split(self, row: list[int], limit: int) -> tuple[list[int], int, bool]:
        tokens = row[:limit]
        for position, token in enumerate(tokens):
            if token in self.eos:
                return tokens[:position], position + 1, True
        return tokens, len(tokens), False

    @torch.inference_mode()
    def generate(self, inputs: list[ModelInput]) -> list[Generation]:
        batch = self._collate(inputs)
        prompt_length = batch["input_ids"].shape[1]
        limits = torch.tensor([item.max_new_tokens for item in inputs], device=self.device)
        output = self.model.generate(
            **batch,
            max_new_tokens=max(item.max_new_tokens for item in inputs),
            do_sample=False,
            num_beams=1,
            stopping_criteria=StoppingCriteriaList([_PerRowLimit(limits, prompt_length)]),
            pad_token_id=self.loaded.pad_token_id,
            eos_token_id=list(self.eos),
        )
        new_tokens = output[:, prompt_length:].tolist()
        results = []
        for item, row in zip(inputs, new_tokens, strict=True):
            tokens, computed, finished = self._split(row, item.max_new_tokens)
            results.append(Generation(tokens, len(item.input_ids), computed, finished))
        return results
