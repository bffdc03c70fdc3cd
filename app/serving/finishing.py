"""Finishing a request whose tokens came back: its text, the objects parsed from it, their mask logits.

None of it runs on the model thread between steps: turning tokens into text and parsing run in the
service's thread pool; only the mask decoder's device work goes back to the model thread, where
`MaskDecoding` decodes the masks of every request that asked since the last step in one call (the
engine's `StepWork`). Placing the masks into images is `app.serving.results`, in the pool again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def read_output(encoder: PromptEncoder, task: Task, tokens: list[int]) -> tuple[str, ParsedOutput | None]:
    """The generated tokens as text, and the objects in it for the tasks that locate."""
    text = encoder.decode(tokens)
    return text, parse_output(task, text)


def masks_wanted(task: Task, parsed: ParsedOutput | None) -> list[tuple[int, tuple[int, ...]]]:
    """(object index, its 16 mask tokens) for each object whose mask the answer carries."""
    if parsed is None or task not in _MASK_TASKS:
        return []
    return [(i, obj.mask_tokens) for i, obj in enumerate(parsed.objects)
            if obj.mask_problem is None and obj.mask_tokens is not None]


class MaskDecoding:
    """Mask logits for several requests at once: each hands its objects' mask tokens, (k, 16); one decoder
    call for all of them; each gets its (k, 64, 64) back."""

    def __init__(self, decoder: MaskDecoder):
        self.decoder = decoder

    def __call__(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        logits = self.decoder.decode(np.concatenate(requests))
        ends = np.cumsum([len(tokens) for tokens in requests])
        return np.split(logits, ends[:-1])
