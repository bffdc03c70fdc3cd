"""`PaliGemmaClient` and its async twin: one method per task, typed results, streamed answers, retries on a
full queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import BaseModel

from paligemma_client import _core
from paligemma_client._core import GenerationOptions, ImageInput, Request, RetryPolicy
from paligemma_client.errors import error_from_response
from paligemma_client.models import (
    AnswerResponse,
    DetectResponse,
    GenerateResponse,
    ModelList,
    SegmentResponse,
    TextResponse,
)
from paligemma_client.streaming import AsyncStream, Stream

if TYPE_CHECKING:
    from typing_extensions import Unpack

R = TypeVar("R", bound=BaseModel)
Self = TypeVar("Self")


class PaliGemmaClient:
    """A client for one paligemma-server.

    `base_url` defaults to PALIGEMMA_URL (else http://localhost:8000) and `api_key` to PALIGEMMA_API_KEY.
    A 429 (queue full) or a 503 with Retry-After is retried after the time the server asks for, at most
    `max_retries` times and `max_retry_wait_s` seconds a wait; other errors raise at once (`APIError`
    subclasses with the server's message, type, field and request id). Images are a path, bytes, an open
    binary file or a PIL image.

    Every task method also takes the `GenerationOptions` keywords: `max_new_tokens`, sampling with
    `temperature` (0, greedy, is the server's default), `top_p`, `top_k` and `seed`, and `adapter` (a LoRA
    adapter the server has loaded; `models()` lists them). Each has a `_stream`
    twin (`caption_stream`...) that returns a `Stream`: the text as it is generated, then the result.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 3, max_retry_wait_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        url, headers = _core.settings(base_url, api_key)
        self.base_url = url
        self.retry = RetryPolicy(max_retries, max_retry_wait_s)
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    def caption(self, image: ImageInput, *, language: str = "en", long: bool = False,
                **options: Unpack[GenerationOptions]) -> TextResponse:
        """A caption (`long=True`: a longer description) in `language`."""
        return self._send(_core.caption(image, language, long, options))

    def vqa(self, image: ImageInput, question: str, *, language: str = "en",
            **options: Unpack[GenerationOptions]) -> AnswerResponse:
        """The answer to `question` about the image."""
        return self._send(_core.vqa(image, question, language, options))

    def ocr(self, image: ImageInput, **options: Unpack[GenerationOptions]) -> TextResponse:
        """The text in the image."""
        return self._send(_core.ocr(image, options))

    def detect(self, image: ImageInput, objects: str | Sequence[str],
               **options: Unpack[GenerationOptions]) -> DetectResponse:
        """Boxes in pixels for `objects` (a list, or one string like "car ; person")."""
        return self._send(_core.detect(image, objects, options))

    def segment(self, image: ImageInput, objects: str | Sequence[str],
                **options: Unpack[GenerationOptions]) -> SegmentResponse:
        """Boxes and masks (COCO RLE) for `objects` (referring expressions)."""
        return self._send(_core.segment(image, objects, options))

    def generate(self, image: ImageInput, prompt: str,
                 **options: Unpack[GenerationOptions]) -> GenerateResponse:
        """The output for a raw PaliGemma prefix, with boxes/masks when it holds any."""
        return self._send(_core.generate(image, prompt, options))

    def caption_stream(self, image: ImageInput, *, language: str = "en", long: bool = False,
                       **options: Unpack[GenerationOptions]) -> Stream[TextResponse]:
        """`caption`, streamed: iterate for the text as it is generated, then read `.result`."""
        return self._stream(_core.caption(image, language, long, options))

    def vqa_stream(self, image: ImageInput, question: str, *, language: str = "en",
                   **options: Unpack[GenerationOptions]) -> Stream[AnswerResponse]:
        """`vqa`, streamed."""
        return self._stream(_core.vqa(image, question, language, options))

    def ocr_stream(self, image: ImageInput, **options: Unpack[GenerationOptions]) -> Stream[TextResponse]:
        """`ocr`, streamed."""
        return self._stream(_core.ocr(image, options))

    def detect_stream(self, image: ImageInput, objects: str | Sequence[str],
                      **options: Unpack[GenerationOptions]) -> Stream[DetectResponse]:
        """`detect`, streamed: the raw output (`<loc>` tokens and labels) as it is generated; the boxes
        are in `.result`."""
        return self._stream(_core.detect(image, objects, options))

    def segment_stream(self, image: ImageInput, objects: str | Sequence[str],
                       **options: Unpack[GenerationOptions]) -> Stream[SegmentResponse]:
        """`segment`, streamed: the raw output as it is generated; boxes and masks are in `.result`."""
        return self._stream(_core.segment(image, objects, options))

    def generate_stream(self, image: ImageInput, prompt: str,
                        **options: Unpack[GenerationOptions]) -> Stream[GenerateResponse]:
        """`generate`, streamed."""
        return self._stream(_core.generate(image, prompt, options))

    def models(self) -> ModelList:
        """The loaded model, then the LoRA adapters served beside it (`parent` names the base)."""
        return self._send(_core.models())

    def close(self) -> None:
        self._http.close()

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _send(self, request: Request[R]) -> R:
        return _core.result(request, self._open(request))

    def _stream(self, request: Request[R]) -> Stream[R]:
        request = _core.streaming(request)
        return Stream(request, self._open(request), self.base_url)

    def _open(self, request: Request[Any]) -> httpx.Response:
        """Send `request`, again after a 429 or a 503 that says when; its successful response (left open
        for a stream), or the server's error raised."""
        http_request = _core.prepare(self._http, request)
        retries = 0
        try:
            while True:
                response = self._http.send(http_request, stream=request.stream)
                delay = self.retry.delay(response, retries)
                if delay is None:
                    break
                response.close()
                retries += 1
                time.sleep(delay)
            if response.status_code >= 400:
                response.read()
                response.close()
                raise error_from_response(response)
        except httpx.TransportError as exc:
            raise _core.connection_error(request, self.base_url, exc) from exc
        return response


class AsyncPaliGemmaClient:
    """`PaliGemmaClient` for asyncio: the same methods, awaited. One client serves many concurrent calls.
    The `_stream` methods, awaited, return an `AsyncStream` (`async for delta in stream`)."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 3, max_retry_wait_s: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 100):
        url, headers = _core.settings(base_url, api_key)
        self.base_url = url
        self.retry = RetryPolicy(max_retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=transport,
                                       limits=httpx.Limits(max_connections=max_connections))

    async def caption(self, image: ImageInput, *, language: str = "en", long: bool = False,
                      **options: Unpack[GenerationOptions]) -> TextResponse:
        return await self._send(_core.caption(image, language, long, options))

    async def vqa(self, image: ImageInput, question: str, *, language: str = "en",
                  **options: Unpack[GenerationOptions]) -> AnswerResponse:
        return await self._send(_core.vqa(image, question, language, options))

    async def ocr(self, image: ImageInput, **options: Unpack[GenerationOptions]) -> TextResponse:
        return await self._send(_core.ocr(image, options))

    async def detect(self, image: ImageInput, objects: str | Sequence[str],
                     **options: Unpack[GenerationOptions]) -> DetectResponse:
        return await self._send(_core.detect(image, objects, options))

    async def segment(self, image: ImageInput, objects: str | Sequence[str],
                      **options: Unpack[GenerationOptions]) -> SegmentResponse:
        return await self._send(_core.segment(image, objects, options))

    async def generate(self, image: ImageInput, prompt: str,
                       **options: Unpack[GenerationOptions]) -> GenerateResponse:
        return await self._send(_core.generate(image, prompt, options))

    async def caption_stream(self, image: ImageInput, *, language: str = "en", long: bool = False,
                             **options: Unpack[GenerationOptions]) -> AsyncStream[TextResponse]:
        return await self._stream(_core.caption(image, language, long, options))

    async def vqa_stream(self, image: ImageInput, question: str, *, language: str = "en",
                         **options: Unpack[GenerationOptions]) -> AsyncStream[AnswerResponse]:
        return await self._stream(_core.vqa(image, question, language, options))

    async def ocr_stream(self, image: ImageInput,
                         **options: Unpack[GenerationOptions]) -> AsyncStream[TextResponse]:
        return await self._stream(_core.ocr(image, options))

    async def detect_stream(self, image: ImageInput, objects: str | Sequence[str],
                            **options: Unpack[GenerationOptions]) -> AsyncStream[DetectResponse]:
        return await self._stream(_core.detect(image, objects, options))

    async def segment_stream(self, image: ImageInput, objects: str | Sequence[str],
                             **options: Unpack[GenerationOptions]) -> AsyncStream[SegmentResponse]:
        return await self._stream(_core.segment(image, objects, options))

    async def generate_stream(self, image: ImageInput, prompt: str,
                              **options: Unpack[GenerationOptions]) -> AsyncStream[GenerateResponse]:
        return await self._stream(_core.generate(image, prompt, options))

    async def models(self) -> ModelList:
        return await self._send(_core.models())

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self: Self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def _send(self, request: Request[R]) -> R:
        return _core.result(request, await self._open(request))

    async def _stream(self, request: Request[R]) -> AsyncStream[R]:
        request = _core.streaming(request)
        return AsyncStream(request, await self._open(request), self.base_url)

    async def _open(self, request: Request[Any]) -> httpx.Response:
        http_request = _core.prepare(self._http, request)
        retries = 0
        try:
            while True:
                response = await self._http.send(http_request, stream=request.stream)
                delay = self.retry.delay(response, retries)
                if delay is None:
                    break
                await response.aclose()
                retries += 1
                await asyncio.sleep(delay)
            if response.status_code >= 400:
                await response.aread()
                await response.aclose()
                raise error_from_response(response)
        except httpx.TransportError as exc:
            raise _core.connection_error(request, self.base_url, exc) from exc
        return response
