"""The inference service: admission -> image preparation -> the step engine -> results.

No HTTP here: routes hand in a `Job` and the upload's bytes and get a `JobResult` or a `ServiceError`.
Image decoding, resizing and mask placement run in a small thread pool, so the model worker only ever
sees ready tensors and the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from app.adapters.bank import AdapterBank, slot_dtype
from app.engine.core import StepRunner
from app.engine.faults import is_out_of_memory, is_unrecoverable
from app.engine.front import Completion, EngineConfig, EngineFront, EngineRequest, TokenCallback
from app.engine.model_thread import ModelThread
from app.engine.observer import EngineObserver
from app.engine.runner import ModelStepRunner, RowInput, RunnerConfig
from app.engine.step_work import StepWork
from app.errors import InferenceFailed, InvalidRequest, NotFound, ServiceError, ShuttingDown, UrlFetchesFull
from app.image_sources import ImageSources
from app.images import decode_image, upload_key
from app.lifecycle import StartupError, unless_draining
from app.masks.decoder import LoadedMaskDecoder
from app.masks.placement import encode_rle, place_mask
from app.model.inputs import ImageTransform, PromptEncoder
from app.model.loader import LoadedModel
from app.serving.finishing import FinishedOutput, MaskDecoding, masks_wanted, read_output
from app.serving.jobs import ImageInput, Job, JobResult, ObjectResult
from app.serving.results import object_results
from app.settings import Settings
from app.tasks.prompts import Task
from app.tracing import record_request_spans

if TYPE_CHECKING:
    from app.adapters.registry import AdapterLease, AdapterRegistry

logger = logging.getLogger(__name__)

# Builds the model side of the engine; tests hand in fakes or wrappers through `create_app`.
RunnerFactory = Callable[[LoadedModel, RunnerConfig], StepRunner]

# One request per task path, run before the server says it is ready.
_WARM_UP_JOBS = (
    Job(Task.CAPTION, "caption en", 2), Job(Task.VQA, "answer en what is this?", 2), Job(Task.OCR, "ocr", 2),
    Job(Task.DETECT, "detect warm up", 2), Job(Task.SEGMENT, "segment warm up", 2),
    Job(Task.GENERATE, "caption es", 2),
)


def runner_config(settings: Settings, adapters: AdapterBank | None = None) -> RunnerConfig:
    return RunnerConfig(rows=settings.max_batch_size, max_prompt_tokens=settings.max_prompt_tokens,
                        max_new_tokens=settings.max_new_tokens,
                        feature_cache_size=settings.feature_cache_size, cuda_graphs=settings.cuda_graphs,
                        adapters=adapters)


def set_up_adapters(settings: Settings, loaded: LoadedModel) -> AdapterRegistry:
    """Wrap the model's linear layers in adapter slots and load PALIGEMMA_ADAPTERS into them, on the model's
    thread before the engine runs; a folder that cannot be served stops start-up, naming it."""
    from app.adapters.folder import AdapterInvalid
    from app.adapters.registry import AdapterRegistry

    bank = AdapterBank(loaded.model, settings.max_adapters, settings.max_lora_rank, loaded.device,
                       slot_dtype(settings.lora_dtype, loaded.dtype))
    logger.info("LoRA adapters: %s", bank.describe())
    registry = AdapterRegistry(bank, loaded.name, loaded.model.config, settings.adapter_root)
    for name, path in settings.adapters:
        try:
            registry.load_now(name, path)
        except AdapterInvalid as exc:
            raise StartupError(f"PALIGEMMA_ADAPTERS: adapter {name!r}: {exc}") from None
    return registry


class InferenceService:
    def __init__(self, settings: Settings, loaded: LoadedModel, observer: EngineObserver,
                 mask_decoder: LoadedMaskDecoder | None = None,
                 on_fatal: Callable[[BaseException], None] = lambda exc: None,
                 runner_factory: RunnerFactory = ModelStepRunner, tracer: Any = None):
        self.settings = settings
        self.tracer = tracer  # an OpenTelemetry tracer, or None (tracing off: app.tracing)
        self.loaded = loaded
        self.mask_decoder = mask_decoder
        self._active = 0  # requests inside run(), for draining
        self.transform = ImageTransform.from_processor(loaded.processor)
        self.encoder = PromptEncoder.from_processor(loaded.processor)
        # Before the runner: the slots take their memory before the KV cache sizes itself to what is left.
        self.adapters = set_up_adapters(settings, loaded) if settings.adapters_enabled else None
        bank = self.adapters.bank if self.adapters is not None else None
        self.runner = runner_factory(loaded, runner_config(settings, bank))
        # What clients send in place of an image file (base64, data URLs, allowed image URLs).
        self.image_sources = ImageSources(max_bytes=settings.max_image_bytes,
                                          url_hosts=settings.image_url_hosts,
                                          url_timeout_s=settings.image_url_timeout_s,
                                          max_url_fetches=settings.max_url_fetches)
        self._draining = asyncio.Event()  # set by begin_drain: fetches not admitted yet are refused
        self._prep = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="prepare")
        # The mask decoder's device work, on the model thread once per step for every request that asks.
        self.mask_work = (StepWork("mask decoding", MaskDecoding(mask_decoder.decoder))
                          if mask_decoder else None)
        self.engine = EngineFront(
            self.runner,
            rows=self.runner.rows,  # what fits: the runner sizes its cache to the memory it finds
            stop_tokens=frozenset(loaded.eos_token_ids),
            config=EngineConfig(settings.max_queue, settings.prefill_tokens),
            observer=observer,
            is_oom=is_out_of_memory,
            is_fatal=is_unrecoverable,
            on_fatal=on_fatal,
            work=[self.mask_work] if self.mask_work else [],
        )

    @property
    def masks_enabled(self) -> bool:
        return self.mask_decoder is not None

    @property
    def busy(self) -> bool:
        """Whether any request is anywhere between admission and its answer."""
        return self._active > 0 or self.engine.busy

    @property
    def decode_graphs(self) -> list[int]:
        graphs = getattr(self.runner, "graphs", None)
        return graphs.captured if graphs is not None else []

    @property
    def decode_graphs_failure(self) -> str | None:
        """Why the decode graphs were discarded at warm-up, if they were (app.engine.graphs)."""
        graphs = getattr(self.runner, "graphs", None)
        failure: str | None = getattr(graphs, "failure", None)
        return failure

    def stalled_for(self) -> float:
        """Seconds the model worker has been inside its current step (0 between steps)."""
        return self.engine.stalled_for()

    # Life ------------------------------------------------------------------------------------------
    async def start(self, model_thread: ModelThread) -> None:
        """Capture the decode graphs and run the mask decoder once, then start the engine's loop; all on
        `model_thread`, the thread that loaded the model (app.engine.model_thread says why)."""
        capture = getattr(self.runner, "capture_graphs", None)
        if capture is not None:
            await model_thread.run(capture)
        if self.mask_decoder is not None:
            await model_thread.run(self._warm_masks)
        self.engine.start(model_thread)

    async def warm_up(self) -> None:
        """Run every task path once through the engine, so the first clients pay no lazy set-up.
        Client-facing limits (pixels, bytes, the queue's size) are not applied here: they must not stop
        start-up."""
        started = time.perf_counter()
        image = io.BytesIO()
        Image.new("RGB", (48, 32), (127, 127, 127)).save(image, format="PNG")
        await asyncio.gather(*(self._run(job, ImageInput(image.getvalue()), None, max_pixels=48 * 32,
                                         bounded=False) for job in _WARM_UP_JOBS))
        logger.info("warm-up: every task path ran in %.2f s", time.perf_counter() - started)

    def _warm_masks(self) -> None:
        assert self.mask_decoder is not None
        logits = self.mask_decoder.decoder.decode(np.zeros((1, 16), dtype=np.int64))
        encode_rle(place_mask(logits[0], (0.25, 0.25, 0.75, 0.75), 48, 32))

    def begin_drain(self) -> None:
        """Stop admitting; on the event loop (a signal handler hands it over: app.__main__)."""
        self.engine.stop_intake()
        self._draining.set()

    def abort_unfinished(self) -> None:
        """The drain deadline passed: answer every admitted request 503 now."""
        self.engine.abort(ShuttingDown("the server shut down before this request finished; retry on another "
                                       "replica", headers={"Retry-After": "1"}))

    async def stop(self, drain_timeout_s: float) -> None:
        await self.engine.stop(drain_timeout_s)
        self._prep.shutdown(wait=False, cancel_futures=True)

    # Requests --------------------------------------------------------------------------------------
    def lease_adapter(self, name: str, param: str = "adapter") -> AdapterLease:
        """Hold the adapter `name` for one request (404 listing the loaded ones when it is not loaded)."""
        if self.adapters is None:
            raise NotFound(f"adapter {name!r} is not loaded: this server serves no adapters (set "
                           "PALIGEMMA_ADAPTERS or PALIGEMMA_ADAPTER_ROOT)", param=param)
        return self.adapters.acquire(name, param)

    async def run(self, job: Job, image: ImageInput, on_tokens: TokenCallback | None = None) -> JobResult:
        """Run `job` on `image`; `on_tokens` gets each step's new tokens (for streaming)."""
        started = time.monotonic()
        # Held from before its image is fetched: an unknown adapter is a 404 before any work is spent.
        lease = self.lease_adapter(job.adapter) if job.adapter is not None else None
        self._active += 1
        try:
            if image.remote:
                await self._fetch(job, image)
            return await self._run(job, image, on_tokens, self.settings.max_image_pixels, started=started,
                                   lease=lease)
        finally:
            if lease is not None:
                lease.release()
            self._active -= 1

    async def _fetch(self, job: Job, image: ImageInput) -> None:
        """An image URL is fetched before its request takes a place in the queue, under the fetches' own
        bound (PALIGEMMA_MAX_URL_FETCHES): a slow host then holds a fetch, never a place that clients
        who send their image need. Not admitted yet, it is refused (503) once the drain begins."""
        self.engine.check_open()
        try:
            await unless_draining(image.read(), self._draining)
        except UrlFetchesFull:
            self.engine.observer.rejected("url_fetches_full")
            raise
        except ShuttingDown:
            self.engine.observer.rejected("shutting_down")
            raise
        except asyncio.CancelledError:
            self._client_left(job)  # while its image was fetched
            raise

    def _client_left(self, job: Job) -> None:
        if job.label:  # a client's request (the warm-up's have no endpoint)
            self.engine.observer.dropped("disconnected")

    async def _run(self, job: Job, image: ImageInput, on_tokens: TokenCallback | None,
                   max_pixels: int, bounded: bool = True, started: float | None = None,
                   lease: AdapterLease | None = None) -> JobResult:
        """`started`: when the request began (before its image URL was fetched), for its timings; `lease`:
        the adapter it runs with, held by the caller."""
        started = time.monotonic() if started is None else started
        loop = asyncio.get_running_loop()
        slot = self.engine.reserve(bounded=bounded)  # 429 / 503 before any work is spent on the image
        try:
            input_ids = self._encode(job.prefix)
            image_bytes = await image.read()
            width, height, pixels, image_key = await loop.run_in_executor(
                self._prep, self._prepare_image, image_bytes, max_pixels)
        except asyncio.CancelledError:
            slot.release()
            self._client_left(job)  # while its image was prepared
            raise
        except BaseException:
            slot.release()
            raise
        prepared = time.monotonic()
        adapter = lease.ref if lease is not None else None
        request = EngineRequest(len(input_ids), job.max_new_tokens,
                                RowInput(input_ids, pixels, image_key, adapter), job.label,
                                adapter=adapter.name if adapter is not None else "", sampling=job.sampling)
        try:
            completion = await self.engine.submit(slot, request, self.settings.request_timeout_s, on_tokens)
        except ServiceError as exc:
            self._trace(job, None, started, prepared, None, None, error=exc.message)
            raise
        generated = time.monotonic()
        objects = None
        output = await self._finish(job, completion)
        if output.parsed is not None:
            objects = await loop.run_in_executor(self._prep, object_results, output, width, height,
                                                 self.masks_enabled)
        finished = time.monotonic()
        self._trace(job, completion, started, prepared, generated, finished)
        return _job_result(completion, output, width, height, objects, job.adapter, {
            "prepare_ms": round((prepared - started) * 1000, 2),
            "queue_and_inference_ms": round((generated - prepared) * 1000, 2),
            "postprocess_ms": round((finished - generated) * 1000, 2),
            "total_ms": round((finished - started) * 1000, 2),
        })

    async def _finish(self, job: Job, completion: Completion) -> FinishedOutput:
        """Text and parse in the thread pool; mask logits from the model thread (its next step)."""
        loop = asyncio.get_running_loop()
        text, parsed = await loop.run_in_executor(self._prep, read_output, self.encoder, job.task,
                                                  completion.tokens)
        masks: list[np.ndarray | None] = [None] * len(parsed.objects) if parsed else []
        wanted = masks_wanted(job.task, parsed) if self.mask_work is not None else []
        if wanted:
            assert self.mask_work is not None
            tokens = np.array([mask_tokens for _, mask_tokens in wanted], dtype=np.int64)
            try:
                logits = await asyncio.wrap_future(self.mask_work.submit(tokens))
            except ServiceError:
                raise
            except Exception as exc:  # logged where it happened
                raise InferenceFailed("the server failed finishing this output") from exc
            for (index, _), mask in zip(wanted, logits, strict=True):
                masks[index] = mask
        return FinishedOutput(text, parsed, masks)

    def _trace(self, job: Job, completion: Completion | None, started: float, prepared: float,
               generated: float | None, finished: float | None, error: str | None = None) -> None:
        """The request's spans (prepare, queue, prefill, decode, postprocess), from its timestamps."""
        if self.tracer is None or not job.label:  # tracing off, or the warm-up (not a request)
            return
        attributes: dict[str, str | int] = {"paligemma.task": job.task.value, "paligemma.endpoint": job.label}
        if completion is not None:
            attributes.update({"paligemma.prompt_tokens": completion.prompt_tokens,
                               "paligemma.completion_tokens": completion.computed,
                               "paligemma.finish_reason": completion.finish_reason})
        record_request_spans(
            self.tracer, f"paligemma.{job.task.value}", attributes, prepared,
            completion.admitted_at if completion else None, completion.first_token_at if completion else None,
            completion.finished_at if completion else None, generated, finished, prepare_start=started,
            prepare_end=prepared, error=error)

    def _encode(self, prefix: str) -> list[int]:
        input_ids = self.encoder.encode(prefix)
        text_tokens = len(input_ids) - self.encoder.image_seq_length
        if text_tokens > self.settings.max_prompt_tokens:
            raise InvalidRequest(
                f"the prompt is {text_tokens} tokens long; at most {self.settings.max_prompt_tokens} are "
                "allowed (PALIGEMMA_MAX_PROMPT_TOKENS): shorten the question, prompt or object names")
        return input_ids

    def _prepare_image(self, data: bytes, max_pixels: int) -> tuple[int, int, torch.Tensor, str]:
        decoded = decode_image(data, max_pixels=max_pixels, min_side=self.transform.min_side)
        # The same bytes always give the same pixels, hence the same features: key the cache on them.
        return decoded.width, decoded.height, self.transform(decoded.image), upload_key(data)


def _job_result(completion: Completion, output: FinishedOutput, width: int, height: int,
                objects: list[ObjectResult] | None, adapter: str | None,
                timings: dict[str, float]) -> JobResult:
    return JobResult(
        text=output.text,
        width=width,
        height=height,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.computed,
        finished=completion.finish_reason == "stop",
        objects=objects,
        dropped_objects=output.parsed.dropped if output.parsed else 0,
        timings=timings,
        adapter=adapter,
    )
