"""Pure ASGI middleware around every request: its id, its access-log line, and its metrics.

The request id is the caller's `X-Request-ID` when it is a plausible id (at most 128 characters, from a
safe set: no spaces, quotes or control characters that could forge log lines or headers), else a new
one. It is sent back in `X-Request-ID`, put in every error body, in the access log and on the trace.
The server writes its own access log (uvicorn's is turned off): one line per request, with the status
actually sent, the time to the last byte and the id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.routes import route_template
from app.metrics import Metrics
from app.tracing import current_span

access_logger = logging.getLogger("app.access")

_TASK_PREFIX = "/v1/"
REQUEST_ID_HEADER = b"x-request-id"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:+/=@-]{1,128}")


def request_id_for(scope: Scope) -> str:
    """The caller's X-Request-ID when it is safe to echo and log, else a new random one."""
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER:
            candidate = value.decode("latin-1").strip()
            if _SAFE_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _is_preflight(scope: Scope) -> bool:
    return scope.get("method") == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in scope.get("headers", []))


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        _annotate_span(scope, request_id)
        started = time.perf_counter()
        status = 500  # what is logged when the app fails before answering (the server then sends 500)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            self._record(scope, status, elapsed)
            _log_access(scope, status, elapsed, request_id)

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        # Browsers' CORS preflights are not API traffic: counting them would inflate every rate.
        if not scope.get("path", "").startswith(_TASK_PREFIX) or _is_preflight(scope):
            return
        endpoint = route_template(scope) or "unmatched"
        # The route puts the adapter there once it knows the name is loaded (never a name a client made up).
        adapter = scope.get("state", {}).get("adapter", "")
        self.metrics.requests.labels(endpoint, str(status), adapter).inc()
        if status < 400:
            self.metrics.request_duration.labels(endpoint).observe(elapsed)


def _annotate_span(scope: Scope, request_id: str) -> None:
    """Put the id on the request span, and its route now: a request refused before routing (401, 413)
    would otherwise have none."""
    span = current_span()
    if span is None:
        return
    span.set_attribute("paligemma.request_id", request_id)
    template = route_template(scope)
    if template is not None:
        span.set_attribute("http.route", template)
        span.update_name(f"{scope.get('method', '')} {template}")


def _log_access(scope: Scope, status: int, elapsed: float, request_id: str) -> None:
    client = scope.get("client")
    address = f"{client[0]}:{client[1]}" if client else "-"
    method, path = scope.get("method", ""), scope.get("path", "")
    duration_ms = round(elapsed * 1000, 1)
    access_logger.info(
        '%s "%s %s HTTP/%s" %d %.1f ms request_id=%s', address, method, path,
        scope.get("http_version", "1.1"), status, duration_ms, request_id,
        extra={"client": address, "method": method, "path": path, "status": status,
               "duration_ms": duration_ms, "request_id": request_id},
    )
