"""One error envelope for every failure: `{"error": {"type", "message", "param", "request_id"}}`."""

from __future__ import annotations

import difflib
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope

from app.api.routes import RouteTable, route_table
from app.errors import InvalidRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from app.schemas import ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)

# Starlette's own HTTP errors, typed like ours where we have a class for the status.
_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed"} | {
    cls.status_code: cls.error_type for cls in (InvalidRequest, PayloadTooLarge, UnsupportedMediaType)
}


def error_response(status: int, error_type: str, message: str, param: str | None = None,
                   request_id: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one place the envelope is built, from the `ErrorResponse` schema the OpenAPI document shows.
    A `JSONResponse` is also an ASGI app: pure ASGI middleware sends one with `await response(scope,
    receive, send)`."""
    error = ErrorBody(type=error_type, message=message, param=param, request_id=request_id)
    return JSONResponse(ErrorResponse(error=error).model_dump(), status_code=status, headers=headers)


def service_error_response(exc: ServiceError, request_id: str | None) -> JSONResponse:
    return error_response(exc.status_code, exc.error_type, exc.message, exc.param, request_id, exc.headers)


def service_error_body(exc: ServiceError, request_id: str | None) -> dict[str, Any]:
    """The envelope as data, for errors reported inside an event stream (its status was sent already)."""
    error = ErrorBody(type=exc.error_type, message=exc.message, param=exc.param, request_id=request_id)
    return ErrorResponse(error=error).model_dump()


def request_id_of(scope: Scope) -> str | None:
    """The id RequestContextMiddleware gave the request (None outside it)."""
    return scope.get("state", {}).get("request_id")


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return service_error_response(exc, request_id_of(request.scope))


def validation_problem(errors: list[Any]) -> tuple[str, str | None]:
    """A pydantic/FastAPI error list -> (message, param) for the envelope: the first problem, by field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "header")]
    param = location[0] if location else None
    message = f"`{'.'.join(location)}`: {first['msg']}" if param else str(first["msg"])
    return message, param


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_problem(list(exc.errors()))
    return error_response(422, "validation_error", message, param, request_id_of(request.scope))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error_type = _HTTP_TYPES.get(exc.status_code, "http_error")
    message = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        # The router's own 404 (no route matched) lists the endpoints; a matched one (a static file
        # that is not there) just names what is missing.
        matched = "endpoint" in request.scope or "route" in request.scope
        message = (f"nothing at {request.url.path}" if matched
                   else not_found_message(route_table(request.app), request.method, request.url.path))
    elif exc.status_code == 405:
        message = method_not_allowed_message(request.method, request.url.path, headers.get("Allow", ""))
    return error_response(exc.status_code, error_type, message, None, request_id_of(request.scope), headers)


def not_found_message(table: RouteTable, method: str, path: str) -> str:
    """A 404 from the router (no route matched): the near misses first, then every endpoint."""
    listed = table.listing()
    paths = sorted({e.partition(" ")[2] for e in listed})
    close = difflib.get_close_matches(path.rstrip("/") or "/", paths, n=2, cutoff=0.8)
    hint = f"did you mean {' or '.join(e for e in listed if e.partition(' ')[2] in close)}? " if close else ""
    return f"no endpoint at {method} {path}; {hint}the endpoints are: {', '.join(listed)}"


def method_not_allowed_message(method: str, path: str, allow: str) -> str:
    allowed = [m.strip() for m in allow.split(",") if m.strip() and m.strip() != "HEAD"]
    return (f"{path} does not take {method}; it takes {' or '.join(allowed) or 'no method'} (see /docs)")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = request_id_of(request.scope)
    logger.exception("unhandled error (request %s)", request_id, exc_info=exc)
    return error_response(500, "internal_error", "the server failed on this request; quote the request_id "
                          "when reporting it", None, request_id)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "A field is wrong, or the image cannot be decoded.",
        401: "Missing or wrong API key (only when PALIGEMMA_API_KEYS is set).",
        404: "A LoRA adapter (`adapter`, or the OpenAI `model`) that is not loaded; the message lists those "
             "that are.",
        413: "The upload, or the image's pixel count, is over its limit.",
        415: "The image is not JPEG, PNG or WebP.",
        422: "The request does not match the schema, or max_new_tokens is over the cap.",
        429: "The queue is full; retry after the Retry-After header's seconds.",
        500: "The server failed on this request (never caused by the request's content).",
        503: "The model is still loading, or the server is shutting down.",
        504: "The request waited longer than PALIGEMMA_REQUEST_TIMEOUT_S.",
    }.items()
}
