"""The task endpoints: read the body, build the prefix, hand to the service, wrap the result.

Every endpoint takes multipart or JSON (`app.api.bodies`), answers JSON, or server-sent events with
`stream`, or (detect, segment) a PNG with the results drawn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from app.api import annotate, convert
from app.api.bodies import Body, read_task_body
from app.api.deps import ServiceDep
from app.api.errors import ERROR_RESPONSES, request_id_of, service_error_body
from app.api.forms import StrictFormRoute
from app.api.protocol import (
    CaptionBody,
    DetectBody,
    GenerateBody,
    OcrBody,
    SegmentBody,
    TaskBody,
    VqaBody,
    request_body_doc,
)
from app.api.streaming import EVENT_STREAM, sse, stream_job
from app.engine.sampling_params import SamplingParams
from app.errors import InvalidRequest, ServiceError, ValidationFailed
from app.schemas import AnswerResponse, DetectResponse, GenerateResponse, SegmentResponse, TextResponse
from app.serving.jobs import ImageInput, Job, JobResult
from app.serving.service import InferenceService
from app.tasks import prompts
from app.tasks.parsing import strip_location_tokens
from app.tasks.prompts import PromptLimits, Task

router = APIRouter(prefix="/v1", tags=["tasks"], responses=ERROR_RESPONSES, route_class=StrictFormRoute)

# Status recorded for a request whose client hung up before its answer (nginx's convention).
CLIENT_CLOSED = 499

_STREAMABLE: dict[int | str, dict[str, Any]] = {
    200: {"content": {EVENT_STREAM: {}},
          "description": "JSON; with `stream`, server-sent events: `delta` events, then one `result` event."},
}
# Detect and segment also answer a PNG: one 200 entry lists both content types (a dict merge of the two
# response maps would keep only the last 200).
_LOCATING: dict[int | str, dict[str, Any]] = {
    **annotate.RESPONSES,
    200: {"content": {**_STREAMABLE[200]["content"], **annotate.RESPONSES[200]["content"]},
          "description": "JSON; with `stream`, server-sent events: `delta` events, then one `result` event; "
                         "with `Accept: image/png` or `render=true`, the image with the results drawn."},
}

class ClientDisconnected(Exception):
    pass


def disconnected_response() -> Response:
    return Response(status_code=CLIENT_CLOSED)


async def _read(request: Request, service: InferenceService, model: type[Body]) -> tuple[Body, ImageInput]:
    return await read_task_body(request, model, service.settings.max_image_bytes, service.image_sources)


def _limits(service: InferenceService) -> PromptLimits:
    return PromptLimits(service.settings.max_objects, service.settings.max_text_chars)


def _max_new_tokens(value: int | None, service: InferenceService, field: str) -> int:
    cap = service.settings.max_new_tokens
    if value is None:
        return service.settings.default_max_new_tokens
    if value > cap:
        raise ValidationFailed(f"`{field}` must be <= {cap} (PALIGEMMA_MAX_NEW_TOKENS). Given: {value}.",
                               param=field)
    return value


def job_for(request: Request, service: InferenceService, task: Task, prefix: str, max_new_tokens: int | None,
            sampling: SamplingParams, adapter: str | None = None, field: str = "max_new_tokens") -> Job:
    """The job for a route; `field` is what the client called the token limit (for messages)."""
    if adapter is not None and service.adapters is not None and service.adapters.is_loaded(adapter):
        # The metrics' `adapter` label: only ever a loaded adapter's name (RequestContextMiddleware).
        request.scope.setdefault("state", {})["adapter"] = adapter
    limit = _max_new_tokens(max_new_tokens, service, field)
    return Job(task, prefix, limit, sampling, label=request.url.path, adapter=adapter)


def _job(request: Request, service: InferenceService, task: Task, prefix: str, body: TaskBody) -> Job:
    sampling = SamplingParams(body.temperature, body.top_p, body.top_k, body.seed)
    return job_for(request, service, task, prefix, body.max_new_tokens, sampling, body.adapter)


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, unless the client hangs up first: then abandon it (its row is freed)."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        # The body is fully read by now, so the next message can only be the client going away.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnected
    return task.result()


def count_prompt_tokens(request: Request, result: JobResult) -> None:
    request.app.state.metrics.prompt_tokens.labels(request.url.path, result.adapter or "").inc(
        result.prompt_tokens)


class TaskEvents:
    """The task endpoints' stream: `delta` events with text, then `result` (or `error`) with a body."""

    def __init__(self, request: Request, build: Callable[[JobResult], BaseModel]):
        self.request = request
        self.build = build

    def delta(self, text: str) -> bytes:
        return sse("delta", {"text": text})

    async def result(self, result: JobResult) -> bytes:
        count_prompt_tokens(self.request, result)
        return sse("result", self.build(result).model_dump(mode="json"))

    def error(self, error: ServiceError) -> bytes:
        return sse("error", service_error_body(error, request_id_of(self.request.scope)))


async def respond(request: Request, service: InferenceService, job: Job, body: TaskBody, image: ImageInput,
                  build: Callable[[JobResult], BaseModel], png: bool = False) -> Any:
    """Run `job` and answer: JSON (`build`), an event stream (`body.stream`) or a PNG (`png`)."""
    if body.stream:
        if png:
            raise InvalidRequest("`stream` and an annotated image (`render`, Accept: image/png) cannot be "
                                 "combined; ask for one of them", param="stream")
        stream = stream_job(lambda on_tokens: service.run(job, image, on_tokens), service.encoder,
                            TaskEvents(request, build))
        return await until_disconnect(request, stream)
    result: JobResult = await until_disconnect(request, service.run(job, image))
    count_prompt_tokens(request, result)
    if png:
        return await annotate.annotated_png(await image.read(), result, service)
    return build(result)


@router.post("/caption", response_model=TextResponse, summary="Caption an image", responses=_STREAMABLE,
             openapi_extra=request_body_doc(CaptionBody))
async def caption(request: Request, service: ServiceDep) -> Any:
    body, image = await _read(request, service, CaptionBody)
    job = _job(request, service, Task.CAPTION, prompts.caption_prompt(body.language, body.long), body)
    return await respond(request, service, job, body, image, lambda result: TextResponse(
        text=strip_location_tokens(result.text), **convert.common_fields(result, service)))


@router.post("/vqa", response_model=AnswerResponse, summary="Answer a question about an image",
             responses=_STREAMABLE, openapi_extra=request_body_doc(VqaBody))
async def vqa(request: Request, service: ServiceDep) -> Any:
    body, image = await _read(request, service, VqaBody)
    prefix = prompts.vqa_prompt(body.question, body.language, _limits(service))
    job = _job(request, service, Task.VQA, prefix, body)
    return await respond(request, service, job, body, image, lambda result: AnswerResponse(
        answer=strip_location_tokens(result.text), **convert.common_fields(result, service)))


@router.post("/ocr", response_model=TextResponse, summary="Read the text in an image", responses=_STREAMABLE,
             openapi_extra=request_body_doc(OcrBody))
async def ocr(request: Request, service: ServiceDep) -> Any:
    body, image = await _read(request, service, OcrBody)
    job = _job(request, service, Task.OCR, prompts.ocr_prompt(), body)
    return await respond(request, service, job, body, image, lambda result: TextResponse(
        text=strip_location_tokens(result.text), **convert.common_fields(result, service)))


@router.post("/detect", response_model=DetectResponse, summary="Detect objects: boxes in pixels",
             responses=_LOCATING, openapi_extra=request_body_doc(DetectBody))
async def detect(request: Request, service: ServiceDep) -> Any:
    return await _locate(request, service, Task.DETECT, DetectBody, lambda result: DetectResponse(
        detections=[convert.detection(o) for o in result.objects or []], dropped=result.dropped_objects,
        **convert.common_fields(result, service)))


@router.post("/segment", response_model=SegmentResponse, summary="Segment objects: boxes and masks",
             responses=_LOCATING, openapi_extra=request_body_doc(SegmentBody))
async def segment(request: Request, service: ServiceDep) -> Any:
    return await _locate(request, service, Task.SEGMENT, SegmentBody, lambda result: SegmentResponse(
        segments=[convert.segment(o) for o in result.objects or []], dropped=result.dropped_objects,
        **convert.common_fields(result, service)))


async def _locate(request: Request, service: InferenceService, task: Task,
                  model: type[DetectBody] | type[SegmentBody],
                  build: Callable[[JobResult], BaseModel]) -> Any:
    """Detect and segment: objects in, boxes (and masks) out, as JSON, a stream or an annotated PNG."""
    body, image = await _read(request, service, model)
    png = annotate.wants_image(request, body.render)
    objects = [body.objects] if isinstance(body.objects, str) else body.objects
    prompt = prompts.detect_prompt if task is Task.DETECT else prompts.segment_prompt
    job = _job(request, service, task, prompt(objects, _limits(service)), body)
    return await respond(request, service, job, body, image, build, png)


@router.post("/generate", response_model=GenerateResponse, summary="Run a raw PaliGemma prefix",
             responses=_STREAMABLE, openapi_extra=request_body_doc(GenerateBody))
async def generate(request: Request, service: ServiceDep) -> Any:
    body, image = await _read(request, service, GenerateBody)
    job = _job(request, service, Task.GENERATE, prompts.raw_prompt(body.prompt, _limits(service)), body)
    return await respond(request, service, job, body, image,
                         lambda result: generate_response(result, service))


def generate_response(result: JobResult, service: InferenceService) -> GenerateResponse:
    objects = result.objects or []
    with_masks = [o for o in objects if o.mask_tokens is not None]
    boxes_only = [o for o in objects if o.mask_tokens is None]
    return GenerateResponse(
        text=strip_location_tokens(result.text),
        detections=[convert.detection(o) for o in boxes_only] if boxes_only else None,
        segments=[convert.segment(o) for o in with_masks] if with_masks else None,
        **convert.common_fields(result, service),
    )
