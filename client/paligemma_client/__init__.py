"""Python client for paligemma-server: typed results for every task, streamed answers, `supervision` export,
a CLI."""

from paligemma_client._core import GenerationOptions
from paligemma_client.client import AsyncPaliGemmaClient, PaliGemmaClient
from paligemma_client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    PaliGemmaError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
)
from paligemma_client.models import (
    RLE,
    AnswerResponse,
    Box,
    Detection,
    DetectResponse,
    GenerateResponse,
    ImageSize,
    ModelCard,
    ModelList,
    Segment,
    SegmentResponse,
    TaskResponse,
    TextResponse,
    Usage,
)
from paligemma_client.streaming import AsyncStream, Stream

__version__ = "0.1.0"

__all__ = [
    "RLE",
    "APIConnectionError",
    "APIError",
    "AnswerResponse",
    "AsyncPaliGemmaClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Box",
    "DetectResponse",
    "Detection",
    "GenerateResponse",
    "GenerationOptions",
    "ImageSize",
    "ModelCard",
    "ModelList",
    "PaliGemmaClient",
    "PaliGemmaError",
    "RateLimitError",
    "Segment",
    "SegmentResponse",
    "ServerError",
    "ServiceUnavailableError",
    "Stream",
    "StreamError",
    "TaskResponse",
    "TextResponse",
    "Usage",
]
