"""Finishing a request whose generation ended, in the worker thread: text, parse, mask logits.

Requests that end in the same step share one mask-decoder call for all their objects. Placing the masks
into images (CPU work) is left to the caller, off the worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.engine.scheduler import Sequence
from app.masks.decoder import MaskDecoder
from app.model.inputs import PromptEncoder
from app.tasks.parsing import ParsedOutput, parse_objects
from app.tasks.prompts import Task

# Tasks whose output is read for <loc>/<seg> tokens, and those whose answer carries masks.
_LOCATING_TASKS = frozenset({Task.DETECT, Task.SEGMENT, Task.GENERATE})
_MASK_TASKS = frozenset({Task.SEGMENT, Task.GENERATE})


@dataclass(frozen=True)
class FinishedOutput:
    text: str  # the output as decoded, <loc>/<seg> tokens included
    parsed: ParsedOutput | None
    # One entry per parsed object: its 64x64 mask logits, or None (no decoder, or invalid tokens).
    mask_logits: list[np.ndarray | None]


def parse_output(task: Task, text: str) -> ParsedOutput | None:
    return parse_objects(text) if task in _LOCATING_TASKS else None


class OutputFinisher:
    """The engine's `Finisher`: each sequence's `context` is its `Task`."""

    def __init__(self, encoder: PromptEncoder, mask_decoder: MaskDecoder | None):
        self.encoder = encoder
        self.mask_decoder = mask_decoder

    def __call__(self, seqs: list[Sequence]) -> list[FinishedOutput]:
        texts = [self.encoder.decode(seq.output_tokens) for seq in seqs]
        parsed = [parse_output(seq.context, text) for seq, text in zip(seqs, texts, strict=True)]
        masks = self._mask_logits(parsed, [seq.context in _MASK_TASKS for seq in seqs])
        return [FinishedOutput(text, parse, mask)
                for text, parse, mask in zip(texts, parsed, masks, strict=True)]

    def _mask_logits(self, parsed: list[ParsedOutput | None],
                     wants_masks: list[bool]) -> list[list[np.ndarray | None]]:
        """Per object of each output, its mask logits, for the outputs whose answer carries masks."""
        masks: list[list[np.ndarray | None]] = [[None] * len(p.objects) if p else [] for p in parsed]
        if self.mask_decoder is None:
            return masks
        wanted = [
            (i, j, obj.mask_tokens)
            for i, (p, wants) in enumerate(zip(parsed, wants_masks, strict=True)) if p is not None and wants
            for j, obj in enumerate(p.objects) if obj.mask_problem is None and obj.mask_tokens is not None
        ]
        if not wanted:
            return masks
        logits = self.mask_decoder.decode(np.array([tokens for _, _, tokens in wanted], dtype=np.int64))
        for (i, j, _), mask in zip(wanted, logits, strict=True):
            masks[i][j] = mask
        return masks
