"""The task endpoints: validate fields, build the prefix, hand to the service, wrap the result."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from app.api import annotate, convert
from app.api.deps import ServiceDep
from app.api.errors import ERROR_RESPONSES
from app.api.forms import StrictFormRoute
from app.engine.jobs import Job, JobResult
from app.engine.service import InferenceService
from app.errors import InvalidImage, PayloadTooLarge, ValidationFailed
from app.schemas import AnswerResponse, DetectResponse, GenerateResponse, SegmentResponse, TextResponse
from app.tasks import prompts
from app.tasks.parsing import strip_location_tokens
from app.tasks.prompts import PromptLimits, Task

router = APIRouter(prefix="/v1", tags=["tasks"], responses=ERROR_RESPONSES, route_class=StrictFormRoute)

ImageFile = Annotated[UploadFile, File(description="The image: JPEG, PNG or WebP.")]
Language = Annotated[str, Form(max_length=16, description="Answer language, e.g. en, es, fr, de, ja.")]
MaxNewTokens = Annotated[
    int | None,
    Form(ge=1, description="Most tokens to generate (default PALIGEMMA_DEFAULT_MAX_NEW_TOKENS, at most "
                           "PALIGEMMA_MAX_NEW_TOKENS)."),
]
Objects = Annotated[
    list[str],
    Form(description="One or more object names or referring expressions: repeat the field, or separate "
                     "them with `;` in one value."),
]

# Status recorded for a request whose client hung up before its answer (nginx's convention).
CLIENT_CLOSED = 499


class ClientDisconnected(Exception):
    pass


def _limits(service: InferenceService) -> PromptLimits:
    return PromptLimits(service.settings.max_objects, service.settings.max_text_chars)


def _max_new_tokens(value: int | None, service: InferenceService) -> int:
    cap = service.settings.max_new_tokens
    if value is None:
        return service.settings.default_max_new_tokens
    if value > cap:
        raise ValidationFailed(
            f"`max_new_tokens` must be <= {cap} (PALIGEMMA_MAX_NEW_TOKENS). Given: {value}.",
            param="max_new_tokens",
        )
    return value


async def _read_image(image: UploadFile, limit: int) -> bytes:
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the image is over {limit} bytes (PALIGEMMA_MAX_IMAGE_BYTES); send a smaller "
                              "or more compressed image", param="image")
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    return data


async def _wait_for_disconnect(request: Request) -> None:
    # The body is fully read by now, so the next message can only be the client going away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _execute(request: Request, service: InferenceService, task: Task, prefix: str,
                   image: UploadFile, max_new_tokens: int | None) -> JobResult:
    job = Job(task, prefix, _max_new_tokens(max_new_tokens, service), label=request.url.path)
    data = await _read_image(image, service.settings.max_image_bytes)
    work = asyncio.ensure_future(service.run(job, data))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()  # abandons the request if it is still queued (counted as `disconnected`)
        raise ClientDisconnected
    result = work.result()
    request.app.state.metrics.prompt_tokens.labels(request.url.path).inc(result.prompt_tokens)
    return result


def disconnected_response() -> Response:
    return Response(status_code=CLIENT_CLOSED)


@router.post("/caption", response_model=TextResponse, summary="Caption an image")
async def caption(request: Request, service: ServiceDep, image: ImageFile, language: Language = "en",
                  long: Annotated[bool, Form(description="A long description (`describe`) instead.")] = False,
                  max_new_tokens: MaxNewTokens = None) -> TextResponse:
    result = await _execute(request, service, Task.CAPTION, prompts.caption_prompt(language, long), image,
                            max_new_tokens)
    return TextResponse(text=result.text.strip(), **convert.common_fields(result, service))


@router.post("/vqa", response_model=AnswerResponse, summary="Answer a question about an image")
async def vqa(request: Request, service: ServiceDep, image: ImageFile,
              question: Annotated[str, Form(description="The question.")], language: Language = "en",
              max_new_tokens: MaxNewTokens = None) -> AnswerResponse:
    prefix = prompts.vqa_prompt(question, language, _limits(service))
    result = await _execute(request, service, Task.VQA, prefix, image, max_new_tokens)
    return AnswerResponse(answer=result.text.strip(), **convert.common_fields(result, service))


@router.post("/ocr", response_model=TextResponse, summary="Read the text in an image")
async def ocr(request: Request, service: ServiceDep, image: ImageFile,
              max_new_tokens: MaxNewTokens = None) -> TextResponse:
    result = await _execute(request, service, Task.OCR, prompts.ocr_prompt(), image, max_new_tokens)
    return TextResponse(text=result.text.strip(), **convert.common_fields(result, service))


@router.post("/detect", response_model=DetectResponse, summary="Detect objects: boxes in pixels",
             responses=annotate.RESPONSES)
async def detect(request: Request, service: ServiceDep, image: ImageFile, objects: Objects,
                 as_image: annotate.WantsImage,
                 max_new_tokens: MaxNewTokens = None) -> DetectResponse | Response:
    prefix = prompts.detect_prompt(objects, _limits(service))
    result = await _execute(request, service, Task.DETECT, prefix, image, max_new_tokens)
    if as_image:
        return await annotate.annotated_png(image, result, service)
    return DetectResponse(detections=[convert.detection(o) for o in result.objects or []],
                          dropped=result.dropped_objects, **convert.common_fields(result, service))


@router.post("/segment", response_model=SegmentResponse, summary="Segment objects: boxes and masks",
             responses=annotate.RESPONSES)
async def segment(request: Request, service: ServiceDep, image: ImageFile, objects: Objects,
                  as_image: annotate.WantsImage,
                  max_new_tokens: MaxNewTokens = None) -> SegmentResponse | Response:
    prefix = prompts.segment_prompt(objects, _limits(service))
    result = await _execute(request, service, Task.SEGMENT, prefix, image, max_new_tokens)
    if as_image:
        return await annotate.annotated_png(image, result, service)
    return SegmentResponse(segments=[convert.segment(o) for o in result.objects or []],
                           dropped=result.dropped_objects, **convert.common_fields(result, service))


@router.post("/generate", response_model=GenerateResponse, summary="Run a raw PaliGemma prefix")
async def generate(request: Request, service: ServiceDep, image: ImageFile,
                   prompt: Annotated[str, Form(description="The prefix as PaliGemma takes it, e.g. "
                                                           "`caption es` or `detect car ; person`.")],
                   max_new_tokens: MaxNewTokens = None) -> GenerateResponse:
    prefix = prompts.raw_prompt(prompt, _limits(service))
    result = await _execute(request, service, Task.GENERATE, prefix, image, max_new_tokens)
    objects = result.objects or []
    with_masks = [o for o in objects if o.mask_tokens is not None]
    boxes_only = [o for o in objects if o.mask_tokens is None and not o.box_normalized.is_empty]
    return GenerateResponse(
        text=strip_location_tokens(result.text),
        detections=[convert.detection(o) for o in boxes_only] if boxes_only else None,
        segments=[convert.segment(o) for o in with_masks] if with_masks else None,
        **convert.common_fields(result, service),
    )
