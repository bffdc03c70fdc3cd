"""What one request is inside the engine, and the batch function the model worker runs.

The worker generates for the whole batch, decodes and parses the text, and decodes every mask of every
request in the batch with one mask-decoder call. Placing masks into images is left to the caller, off
the worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from app.model.inputs import PromptEncoder
from app.model.runner import Generation, ModelInput, ModelRunner
from app.tasks.parsing import ParsedOutput, parse_detections, parse_objects
from app.tasks.prompts import Task

# Tasks whose output is read for <loc>/<seg> tokens.
_LOCATING_TASKS = frozenset({Task.DETECT, Task.SEGMENT, Task.GENERATE})


@dataclass(frozen=True)
class WorkRequest:
    task: Task
    model_input: ModelInput


@dataclass(frozen=True)
class WorkResult:
    generation: Generation
    text: str
    parsed: ParsedOutput | None
    # One entry per parsed object: its 64x64 mask logits, or None (no decoder, or invalid tokens).
    mask_logits: list[np.ndarray | None]


def _parse(task: Task, text: str) -> ParsedOutput | None:
    if task is Task.DETECT:
        return parse_detections(text)  # boxes only: empty boxes are dropped
    return parse_objects(text) if task in _LOCATING_TASKS else None


class BatchWork:
    """The callable the batcher hands each batch to (in the worker thread)."""

    def __init__(self, runner: ModelRunner, encoder: PromptEncoder, mask_decoder: torch.nn.Module | None):
        self.runner = runner
        self.encoder = encoder
        self.mask_decoder = mask_decoder

    def __call__(self, batch: list[WorkRequest]) -> list[WorkResult]:
        generations = self.runner.generate([request.model_input for request in batch])
        texts = [self.encoder.decode(g.token_ids) for g in generations]
        parsed = [_parse(request.task, text) for request, text in zip(batch, texts, strict=True)]
        masks = self._decode_masks(parsed)
        return [
            WorkResult(generation, text, parse, mask)
            for generation, text, parse, mask in zip(generations, texts, parsed, masks, strict=True)
        ]

    def _decode_masks(self, parsed: list[ParsedOutput | None]) -> list[list[np.ndarray | None]]:
        masks: list[list[np.ndarray | None]] = [[None] * len(p.objects) if p else [] for p in parsed]
        if self.mask_decoder is None:
            return masks
        wanted = [
            (i, j, obj.mask_tokens)
            for i, p in enumerate(parsed) if p is not None
            for j, obj in enumerate(p.objects) if obj.mask_problem is None and obj.mask_tokens is not None
        ]
        if not wanted:
            return masks
        codes = torch.tensor([tokens for _, _, tokens in wanted], dtype=torch.long)
        device = next(self.mask_decoder.parameters()).device
        with torch.inference_mode():
            logits = self.mask_decoder(codes.to(device)).float().cpu().numpy()
        for (i, j, _), mask in zip(wanted, logits, strict=True):
            masks[i][j] = mask
        return masks
