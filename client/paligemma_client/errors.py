"""Errors raised by the client: the server's error envelope, as exceptions with its fields."""

from __future__ import annotations

import json

import httpx


class PaliGemmaError(Exception):
    """Base of every error this package raises."""


class APIConnectionError(PaliGemmaError):
    """The server could not be reached, or the connection failed before an answer came."""


class APIError(PaliGemmaError):
    """The server answered with an error: `{"error": {"type", "message", "param", "request_id"}}`."""

    def __init__(self, status_code: int, error_type: str, message: str, param: str | None = None,
                 request_id: str | None = None, retry_after: str | None = None):
        self.status_code = status_code
        self.type = error_type
        self.message = message
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.status_code} {self.type}: {self.message}"
        if self.param:
            text += f" (field: {self.param})"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        return text


class BadRequestError(APIError):
    """400, 413, 415, 422: something in the request is wrong; the message says what."""


class AuthenticationError(APIError):
    """401: the API key is missing or wrong."""


class RateLimitError(APIError):
    """429: the server's queue stayed full through every retry."""


class ServiceUnavailableError(APIError):
    """503: the model is loading or the server is shutting down (still so after every retry)."""


class ServerError(APIError):
    """Any other 5xx: the server failed; quote the request id when reporting it."""


class StreamError(APIError):
    """The server reported a failure inside an event stream. Its response had begun (HTTP 200) when the
    request failed, so the error envelope came as an `error` event; `status_code` is the stream's 200.
    Refusals (a bad field, a full queue...) come before any stream begins, as the classes above."""

    def __str__(self) -> str:
        text = f"{self.type} (inside the stream): {self.message}"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        return text


_BY_STATUS: dict[int, type[APIError]] = {400: BadRequestError, 401: AuthenticationError, 413: BadRequestError,
                                          415: BadRequestError, 422: BadRequestError, 429: RateLimitError,
                                          503: ServiceUnavailableError}


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response, built from its envelope (or its status and text when the body
    is not the server's envelope, e.g. a proxy's error page)."""
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    request_id = response.headers.get("x-request-id")
    retry_after = response.headers.get("retry-after")
    try:
        error = json.loads(response.content)["error"]
        return cls(status, str(error["type"]), str(error["message"]), error.get("param"),
                   error.get("request_id") or request_id, retry_after)
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return cls(status, "http_error", text, None, request_id, retry_after)


def error_from_event(data: object, status: int, request_id: str | None) -> StreamError:
    """The exception for a stream's `error` event (its data: the server's error envelope)."""
    try:
        error = data["error"]  # type: ignore[index]
        return StreamError(status, str(error["type"]), str(error["message"]), error.get("param"),
                           error.get("request_id") or request_id)
    except (KeyError, TypeError, AttributeError):
        return StreamError(status, "invalid_event", f"an error event without the error envelope: {data!r}",
                           None, request_id)
