"""Python client for paligemma-server: typed results for every task, `supervision` export, a CLI."""

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

__version__ = "0.1.0"

__all__ = [
    "RLE",
    "APIConnectionError",
    "APIError",
    "AnswerResponse",
    "AsyncPaliGemmaClient",
    "AuthenticationError",
    "BadRequestError",
    "Box",
    "DetectResponse",
    "Detection",
    "GenerateResponse",
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
    "TaskResponse",
    "TextResponse",
    "Usage",
]
