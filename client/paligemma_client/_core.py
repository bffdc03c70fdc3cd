"""What the sync and async clients share: building each task's request, reading images, deciding on retries,
and turning responses into results or errors. No I/O on the network here."""

from __future__ import annotations

import email.utils
import io
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, Union

import httpx
from pydantic import BaseModel

from paligemma_client.errors import APIConnectionError
from paligemma_client.models import (
    AnswerResponse,
    DetectResponse,
    GenerateResponse,
    ModelList,
    SegmentResponse,
    TextResponse,
)

if TYPE_CHECKING:
    from PIL import Image

# A path, the file's bytes, an open binary file, or a PIL image (sent as PNG).
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], "Image.Image"]

R = TypeVar("R", bound=BaseModel)

DEFAULT_URL = "http://localhost:8000"
EVENT_STREAM = "text/event-stream"
RETRY_STATUSES = frozenset({429, 503})  # queue full; loading or draining: both say when to come back
_SIGNATURES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"))
# Modes a PNG can hold; anything else (CMYK, YCbCr, LAB, HSV, F, I) is sent as RGB.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})


@dataclass(frozen=True)
class Request(Generic[R]):
    """One call: where it goes, what it returns, and for a task its image and text fields (a list value is
    a repeated field)."""

    path: str
    result: type[R]
    image: ImageInput | None = None
    fields: dict[str, str | list[str]] = field(default_factory=dict)
    stream: bool = False  # answered with server-sent events (`stream=true` is among the fields)

    @property
    def method(self) -> str:
        return "GET" if self.image is None else "POST"


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    max_wait_s: float = 60.0
    backoff_s: float = 0.5  # when the server says nothing about when to come back

    def delay(self, response: httpx.Response, retries_done: int) -> float | None:
        """Seconds to wait before trying `response`'s request again, or None to stop."""
        if response.status_code not in RETRY_STATUSES or retries_done >= self.max_retries:
            return None
        header = response.headers.get("retry-after")
        if header is None:
            if response.status_code == 503:
                return None  # a 503 without Retry-After is not a "come back later"
            return min(self.backoff_s * 2**retries_done, self.max_wait_s)
        return min(max(_seconds(header), 0.0), self.max_wait_s)


def _seconds(retry_after: str) -> float:
    try:
        return float(retry_after)
    except ValueError:
        when = email.utils.parsedate_to_datetime(retry_after)  # the HTTP-date form
        return when.timestamp() - time.time()


def prepare(http: httpx.Client | httpx.AsyncClient, request: Request[Any]) -> httpx.Request:
    """The HTTP request, ready to send (and to send again): the image is read once, here."""
    if request.image is None:
        return http.build_request("GET", request.path)
    name, data = read_image(request.image)
    headers = {"Accept": EVENT_STREAM} if request.stream else None
    return http.build_request("POST", request.path, files={"image": (name, data, content_type(data))},
                              data=request.fields, headers=headers)


def read_image(image: ImageInput) -> tuple[str, bytes]:
    """(file name, bytes) for any accepted image input."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes()
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(image, pil.Image):
        buffer = io.BytesIO()
        (image if image.mode in _PNG_MODES else image.convert("RGB")).save(buffer, format="PNG")
        return "image.png", buffer.getvalue()
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("the image file must be opened in binary mode ('rb')")
        return Path(str(getattr(image, "name", "image"))).name, data
    raise TypeError(f"image must be a path, bytes, a binary file or a PIL image; got {type(image).__name__}")


def content_type(data: bytes) -> str:
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"  # the server recognises images by their bytes and says what it got


def result(request: Request[R], response: httpx.Response) -> R:
    return request.result.model_validate_json(response.content)


def connection_error(request: Request[Any], base_url: str, exc: Exception) -> APIConnectionError:
    return APIConnectionError(f"{request.method} {base_url}{request.path} failed: {exc!r}; is the server "
                              "running there? (set the URL with base_url or PALIGEMMA_URL)")


class GenerationOptions(TypedDict, total=False):
    """Keyword arguments every task method takes; left out (or None), the server's default applies.

    max_new_tokens: most tokens to generate (the server caps it).
    temperature: 0 (the server's default) decodes greedily; above 0 (at most 2) samples.
    top_p: with temperature > 0, sample from the smallest set of tokens whose probability reaches it.
    top_k: with temperature > 0, sample from the k likeliest tokens (0: no limit).
    seed: makes sampling repeatable: the same request and seed give the same output.
    adapter: a LoRA adapter the server has loaded (`models()` lists them); left out: the base model.
    """

    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    adapter: str | None


_OPTIONS = tuple(GenerationOptions.__annotations__)


def _options(options: GenerationOptions) -> dict[str, str | list[str]]:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}; the options every task takes are "
                        f"{', '.join(_OPTIONS)}")
    return {name: str(value) for name, value in options.items() if value is not None}


def _objects(objects: str | Sequence[str]) -> str | list[str]:
    # One string goes as one field (the server splits it on `;`); a sequence as a repeated field.
    return objects if isinstance(objects, str) else list(objects)


def streaming(request: Request[R]) -> Request[R]:
    """The same request, asking for server-sent events: text deltas, then the result."""
    return replace(request, fields={**request.fields, "stream": "true"}, stream=True)


# The requests, one per task: the clients' methods are these plus sending.

def caption(image: ImageInput, language: str, long: bool,
            options: GenerationOptions) -> Request[TextResponse]:
    fields = {"language": language, "long": "true" if long else "false", **_options(options)}
    return Request("/v1/caption", TextResponse, image, fields)


def vqa(image: ImageInput, question: str, language: str,
        options: GenerationOptions) -> Request[AnswerResponse]:
    return Request("/v1/vqa", AnswerResponse, image,
                   {"question": question, "language": language, **_options(options)})


def ocr(image: ImageInput, options: GenerationOptions) -> Request[TextResponse]:
    return Request("/v1/ocr", TextResponse, image, _options(options))


def detect(image: ImageInput, objects: str | Sequence[str],
           options: GenerationOptions) -> Request[DetectResponse]:
    return Request("/v1/detect", DetectResponse, image, {"objects": _objects(objects), **_options(options)})


def segment(image: ImageInput, objects: str | Sequence[str],
            options: GenerationOptions) -> Request[SegmentResponse]:
    return Request("/v1/segment", SegmentResponse, image, {"objects": _objects(objects), **_options(options)})


def generate(image: ImageInput, prompt: str, options: GenerationOptions) -> Request[GenerateResponse]:
    return Request("/v1/generate", GenerateResponse, image, {"prompt": prompt, **_options(options)})


def models() -> Request[ModelList]:
    return Request("/v1/models", ModelList)


def settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The base URL and headers, from the arguments or else PALIGEMMA_URL / PALIGEMMA_API_KEY."""
    url = base_url or os.environ.get("PALIGEMMA_URL") or DEFAULT_URL
    key = api_key if api_key is not None else os.environ.get("PALIGEMMA_API_KEY")
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return url.rstrip("/"), headers
