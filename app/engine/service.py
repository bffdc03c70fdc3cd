"""The inference service: admission -> image preparation -> batching queue -> results.

No HTTP here: routes hand in a `Job` and the upload's bytes and get a `JobResult` (plain dataclasses)
or a `ServiceError`. Image decoding, resizing and mask placement run in a small thread pool so the
model worker only ever sees ready tensors.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from app.engine.batcher import Batcher, BatcherConfig
from app.engine.work import BatchWork, WorkRequest, WorkResult
from app.images import decode_image
from app.masks.decoder import LoadedMaskDecoder
from app.masks.placement import encode_rle, mask_area, mask_bbox, place_mask
from app.metrics import Metrics
from app.model.inputs import ImageTransform, PromptEncoder
from app.model.loader import LoadedModel
from app.model.runner import ModelInput, ModelRunner
from app.settings import Settings
from app.tasks.parsing import Box, ParsedObject
from app.tasks.prompts import Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    task: Task
    prefix: str
    max_new_tokens: int


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
    finished: bool
    objects: list[ObjectResult] | None  # None for tasks that do not locate
    dropped_objects: int
    timings: dict[str, float] = field(default_factory=dict)


class InferenceService:
    def __init__(self, settings: Settings, loaded: LoadedModel, metrics: Metrics,
                 mask_decoder: LoadedMaskDecoder | None = None,
                 on_fatal: Callable[[BaseException], None] = lambda exc: None):
        self.settings = settings
        self.loaded = loaded
        self.metrics = metrics
        self.mask_decoder = mask_decoder  # a LoadedMaskDecoder, or None
        self._active = 0  # requests inside run(), for draining
        self.transform = ImageTransform.from_processor(loaded.processor)
        self.encoder = PromptEncoder.from_processor(loaded.processor)
        self.runner = ModelRunner(loaded, settings.feature_cache_size)
        self._prep = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="prepare")
        self.batcher: Batcher[WorkRequest, WorkResult] = Batcher(
            BatchWork(self.runner, self.encoder, mask_decoder.decoder if mask_decoder else None),
            BatcherConfig(settings.max_batch_size, settings.max_batch_wait_ms / 1000, settings.max_queue),
            observer=metrics,
            is_oom=_is_out_of_memory,
            is_fatal=_is_unrecoverable,
            on_fatal=on_fatal,
            group_key=lambda work: work.model_input.max_new_tokens,
        )

    @property
    def masks_enabled(self) -> bool:
        return self.mask_decoder is not None

    @property
    def mask_decoder_info(self) -> LoadedMaskDecoder | None:
        return self.mask_decoder

    @property
    def busy(self) -> bool:
        """Whether any request is anywhere between admission and its answer."""
        return self._active > 0 or self.batcher.busy

    async def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        """One real batch through the batcher and the worker, so the first client pays no lazy set-up.

        It skips image decoding on purpose: client-facing limits (pixels, bytes) must not stop start-up.
        """
        image = Image.new("RGB", (self.transform.width, self.transform.height), (127, 127, 127))
        work = WorkRequest(Task.SEGMENT, ModelInput(self.encoder.encode("segment warm up"),
                                                    self.transform(image), 2))
        await self.batcher.submit(self.batcher.reserve(), work, self.settings.request_timeout_s)

    async def stop(self) -> None:
        await self.batcher.stop(self.settings.drain_timeout_s)
        self._prep.shutdown(wait=False, cancel_futures=True)

    async def run(self, job: Job, image_bytes: bytes) -> JobResult:
        self._active += 1
        try:
            return await self._run(job, image_bytes)
        finally:
            self._active -= 1

    async def _run(self, job: Job, image_bytes: bytes) -> JobResult:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        slot = self.batcher.reserve()  # 429 / 503 before any work is spent on the image
        try:
            width, height, pixels, image_key = await loop.run_in_executor(self._prep, self._prepare_image,
                                                                           image_bytes)
            input_ids = self.encoder.encode(job.prefix)
        except BaseException:
            slot.release()
            raise
        prepared = time.perf_counter()
        work = WorkRequest(job.task, ModelInput(input_ids, pixels, job.max_new_tokens, image_key))
        result = await self.batcher.submit(slot, work, self.settings.request_timeout_s)
        generated = time.perf_counter()
        if result.generation.cached_features:
            self.metrics.feature_cache_hits.inc()
        objects = None
        if result.parsed is not None:
            objects = await loop.run_in_executor(self._prep, self._objects, result, width, height)
        finished = time.perf_counter()
        return JobResult(
            text=result.text,
            width=width,
            height=height,
            prompt_tokens=result.generation.prompt_tokens,
            completion_tokens=result.generation.completion_tokens,
            finished=result.generation.finished,
            objects=objects,
            dropped_objects=result.parsed.dropped if result.parsed else 0,
            timings={
                "prepare_ms": round((prepared - started) * 1000, 2),
                "queue_and_inference_ms": round((generated - prepared) * 1000, 2),
                "postprocess_ms": round((finished - generated) * 1000, 2),
                "total_ms": round((finished - started) * 1000, 2),
            },
        )

    def _prepare_image(self, data: bytes) -> tuple[int, int, torch.Tensor, str]:
        decoded = decode_image(data, max_pixels=self.settings.max_image_pixels,
                               min_side=self.transform.min_side)
        # The same bytes always give the same pixels, hence the same features: key the cache on them.
        image_key = hashlib.blake2b(data, digest_size=16).hexdigest()
        return decoded.width, decoded.height, self.transform(decoded.image), image_key

    def _objects(self, result: WorkResult, width: int, height: int) -> list[ObjectResult]:
        assert result.parsed is not None
        return [
            _object_result(obj, logits, width, height, self.masks_enabled)
            for obj, logits in zip(result.parsed.objects, result.mask_logits, strict=True)
        ]


def _object_result(obj: ParsedObject, logits: np.ndarray | None, width: int, height: int,
                   masks_enabled: bool) -> ObjectResult:
    mask = None
    problem = obj.mask_problem
    if logits is not None:
        b = obj.box
        rle = encode_rle(place_mask(logits, (b.x_min, b.y_min, b.x_max, b.y_max), width, height))
        bbox = mask_bbox(rle)
        mask = MaskResult(rle, mask_area(rle), Box(*bbox) if bbox else None)
    elif problem is None and obj.mask_tokens is not None and not masks_enabled:
        problem = "no mask decoder is loaded (set PALIGEMMA_MASK_DECODER)"
    return ObjectResult(
        label=obj.label,
        box=obj.box.to_pixels(width, height),
        box_normalized=obj.box,
        mask_tokens=obj.mask_tokens,
        mask=mask,
        mask_problem=problem,
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def _is_unrecoverable(exc: BaseException) -> bool:
    """Errors after which the device cannot be trusted: CUDA leaves its context broken (device-side
    asserts, illegal memory accesses), so every later call would fail too; only a restart helps."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return "CUDA error" in str(exc)

