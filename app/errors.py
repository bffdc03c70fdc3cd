"""Domain errors: one class per outcome a client can see, each knowing its HTTP status.

Everything the service refuses is raised as a `ServiceError` subclass somewhere below the HTTP layer;
`app.api.errors` turns them into the one JSON envelope `{"error": {"type", "message", "param"}}`.
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    """A field the client sent is wrong (value, format, bounds)."""

    status_code = 400
    error_type = "invalid_request"


class InvalidImage(InvalidRequest):
    """The upload is not an image we can decode (corrupt, truncated, empty, too many pixels)."""

    error_type = "invalid_image"

    def __init__(self, message: str, *, param: str | None = "image", headers: dict[str, str] | None = None):
        super().__init__(message, param=param, headers=headers)


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "unauthorized"


class Forbidden(ServiceError):
    """The server is configured not to do this (a feature turned off by its settings)."""

    status_code = 403
    error_type = "forbidden"


class NotFound(ServiceError):
    """A named resource (an adapter) does not exist; the message lists those that do."""

    status_code = 404
    error_type = "not_found"


class Conflict(ServiceError):
    """The request clashes with the server's state (a name in use, every slot taken)."""

    status_code = 409
    error_type = "conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    error_type = "unsupported_media_type"


class ValidationFailed(ServiceError):
    """The request does not match the schema (missing field, wrong type, value over a cap)."""

    status_code = 422
    error_type = "validation_error"


class QueueFull(ServiceError):
    status_code = 429
    error_type = "queue_full"


class UrlFetchesFull(ServiceError):
    """As many image URLs are being fetched as PALIGEMMA_MAX_URL_FETCHES allows (a bound of their own,
    apart from the model queue's)."""

    status_code = 429
    error_type = "url_fetches_full"


class NotReady(ServiceError):
    status_code = 503
    error_type = "not_ready"


class ShuttingDown(ServiceError):
    status_code = 503
    error_type = "shutting_down"


class DeadlineExceeded(ServiceError):
    status_code = 504
    error_type = "timeout"


class RenderingUnavailable(ServiceError):
    """An annotated image was asked for, but the drawing library (the `render` extra) is not installed."""

    status_code = 501
    error_type = "not_implemented"


class InferenceFailed(ServiceError):
    """The model worker raised on this request; the client did nothing wrong."""

    status_code = 500
    error_type = "internal_error"


class UpstreamTimeout(ServiceError):
    """An image URL did not answer in full within PALIGEMMA_IMAGE_URL_TIMEOUT_S (a gateway timeout: the
    server waited on the URL's host, not on its own model)."""

    status_code = 504
    error_type = "upstream_timeout"
