"""What a route hands the service (`Job`) and what it gets back (`JobResult`): plain dataclasses.

The public wire types live in `app.schemas`; `app.api.convert` turns these into them at the edge.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from app.engine.sampling_params import GREEDY, SamplingParams
from app.tasks.parsing import Box
from app.tasks.prompts import Task


class ImageInput:
    """The image a request carries: the upload's bytes, or a loader for what the client sent in their
    place (base64, a data URL, an image URL). A local loader (base64) is called once the request holds
    its queue slot, so a burst over capacity decodes nothing; a `remote` one (an image URL) is called
    before, under the fetches' own bound, so a slow host never holds a slot. Read once; later reads give
    the same bytes."""

    def __init__(self, data: bytes | None = None, loader: Callable[[], Awaitable[bytes]] | None = None,
                 remote: bool = False):
        if (data is None) == (loader is None):
            raise ValueError("give the bytes or a loader, not both")
        self._data = data
        self._loader = loader
        self.remote = remote

    async def read(self) -> bytes:
        if self._data is None:
            assert self._loader is not None
            self._data = await self._loader()
        return self._data


@dataclass(frozen=True)
class Job:
    task: Task
    prefix: str
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    label: str = ""  # the endpoint, for metrics
    adapter: str | None = None  # a loaded LoRA adapter's name; None: the base


@dataclass(frozen=True)
class MaskResult:
    rle: dict[str, object]
    area: int
    box: Box | None  # pixel box of the mask itself (None when empty)


@dataclass(frozen=True)
class ObjectResult:
    label: str
    box: Box  # pixels
    box_normalized: Box
    mask_tokens: tuple[int, ...] | None
    mask: MaskResult | None
    mask_problem: str | None


@dataclass(frozen=True)
class JobResult:
    text: str  # the model's output as decoded (loc/seg tokens included)
    width: int
    height: int
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # ended with <eos> (False: cut at max_new_tokens)
    objects: list[ObjectResult] | None  # None for tasks that do not locate
    dropped_objects: int
    timings: dict[str, float] = field(default_factory=dict)
    adapter: str | None = None  # the LoRA adapter it ran with
