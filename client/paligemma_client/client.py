"""`PaliGemmaClient` and its async twin: one method per task, typed results, retries on a full queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar

import httpx
from pydantic import BaseModel

from paligemma_client import _core
from paligemma_client._core import ImageInput, Request, RetryPolicy
from paligemma_client.models import (
    AnswerResponse,
    DetectResponse,
    GenerateResponse,
    ModelList,
    SegmentResponse,
    TextResponse,
)

R = TypeVar("R", bound=BaseModel)
Self = TypeVar("Self")


class PaliGemmaClient:
    """A client for one paligemma-server.

    `base_url` defaults to PALIGEMMA_URL (else http://localhost:8000) and `api_key` to PALIGEMMA_API_KEY.
    A 429 (queue full) or a 503 with Retry-After is retried after the time the server asks for, at most
    `max_retries` times and `max_retry_wait_s` seconds a wait; other errors raise at once (`APIError`
    subclasses with the server's message, type, field and request id). Images are a path, bytes, an open
    binary file or a PIL image.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 3, max_retry_wait_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        url, headers = _core.settings(base_url, api_key)
        self.base_url = url
        self.retry = RetryPolicy(max_retries, max_retry_wait_s)
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    def caption(self, image: ImageInput, *, language: str = "en", long: bool = False,
                max_new_tokens: int | None = None) -> TextResponse:
        """A caption (`long=True`: a longer description) in `language`."""
        return self._send(_core.caption(image, language, long, max_new_tokens))

    def vqa(self, image: ImageInput, question: str, *, language: str = "en",
            max_new_tokens: int | None = None) -> AnswerResponse:
        """The answer to `question` about the image."""
        return self._send(_core.vqa(image, question, language, max_new_tokens))

    def ocr(self, image: ImageInput, *, max_new_tokens: int | None = None) -> TextResponse:
        """The text in the image."""
        return self._send(_core.ocr(image, max_new_tokens))

    def detect(self, image: ImageInput, objects: str | Sequence[str], *,
               max_new_tokens: int | None = None) -> DetectResponse:
        """Boxes in pixels for `objects` (a list, or one string like "car ; person")."""
        return self._send(_core.detect(image, objects, max_new_tokens))

    def segment(self, image: ImageInput, objects: str | Sequence[str], *,
                max_new_tokens: int | None = None) -> SegmentResponse:
        """Boxes and masks (COCO RLE) for `objects` (referring expressions)."""
        return self._send(_core.segment(image, objects, max_new_tokens))

    def generate(self, image: ImageInput, prompt: str, *,
                 max_new_tokens: int | None = None) -> GenerateResponse:
        """The output for a raw PaliGemma prefix, with boxes/masks when it holds any."""
        return self._send(_core.generate(image, prompt, max_new_tokens))

    def models(self) -> ModelList:
        """The loaded model."""
        return self._send(_core.models())

    def close(self) -> None:
        self._http.close()

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _send(self, request: Request[R]) -> R:
        prepared = _core.prepare(request)
        retries = 0
        while True:
            try:
                if prepared is None:
                    response = self._http.get(request.path)
                else:
                    response = self._http.post(prepared.path, files=prepared.files, data=prepared.data)
            except httpx.TransportError as exc:
                raise _core.connection_error(request, self.base_url, exc) from exc
            delay = self.retry.delay(response, retries)
            if delay is None:
                return _core.result(request, response)
            retries += 1
            time.sleep(delay)


class AsyncPaliGemmaClient:
    """`PaliGemmaClient` for asyncio: the same methods, awaited. One client serves many concurrent calls."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 3, max_retry_wait_s: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 100):
        url, headers = _core.settings(base_url, api_key)
        self.base_url = url
        self.retry = RetryPolicy(max_retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=transport,
                                       limits=httpx.Limits(max_connections=max_connections))

    async def caption(self, image: ImageInput, *, language: str = "en", long: bool = False,
                      max_new_tokens: int | None = None) -> TextResponse:
        return await self._send(_core.caption(image, language, long, max_new_tokens))

    async def vqa(self, image: ImageInput, question: str, *, language: str = "en",
                  max_new_tokens: int | None = None) -> AnswerResponse:
        return await self._send(_core.vqa(image, question, language, max_new_tokens))

    async def ocr(self, image: ImageInput, *, max_new_tokens: int | None = None) -> TextResponse:
        return await self._send(_core.ocr(image, max_new_tokens))

    async def detect(self, image: ImageInput, objects: str | Sequence[str], *,
                     max_new_tokens: int | None = None) -> DetectResponse:
        return await self._send(_core.detect(image, objects, max_new_tokens))

    async def segment(self, image: ImageInput, objects: str | Sequence[str], *,
                      max_new_tokens: int | None = None) -> SegmentResponse:
        return await self._send(_core.segment(image, objects, max_new_tokens))

    async def generate(self, image: ImageInput, prompt: str, *,
                       max_new_tokens: int | None = None) -> GenerateResponse:
        return await self._send(_core.generate(image, prompt, max_new_tokens))

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
        prepared = _core.prepare(request)
        retries = 0
        while True:
            try:
                if prepared is None:
                    response = await self._http.get(request.path)
                else:
                    response = await self._http.post(prepared.path, files=prepared.files, data=prepared.data)
            except httpx.TransportError as exc:
                raise _core.connection_error(request, self.base_url, exc) from exc
            delay = self.retry.delay(response, retries)
            if delay is None:
                return _core.result(request, response)
            retries += 1
            await asyncio.sleep(delay)


