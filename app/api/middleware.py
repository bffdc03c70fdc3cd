"""Pure ASGI middleware: request ids, request metrics, and the request-body size limit.

The body limit counts bytes while they stream in, so an oversized upload is refused without being read
to the end or held in memory; a declared Content-Length over the limit is refused before any byte.
Hand-written rather than Starlette's RequestBodyLimitMiddleware (FastAPI's `max_body_size`): its 413 says
"Content Too Large" and names neither the limit nor the setting that raises it.
"""

from __future__ import annotations

import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import service_error_response
from app.errors import PayloadTooLarge
from app.metrics import Metrics

_TASK_PREFIX = "/v1/"


class _BodyTooLarge(Exception):
    pass


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, body_limit: int):
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        received = 0
        exceeded = False

        declared = _content_length(scope)
        if declared is not None and declared > self.body_limit:
            await self._too_large(scope, receive, send, request_id, declared)
            self._record(scope, 413, started)
            return

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.body_limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def send_with_id(message: Message) -> None:
            if exceeded:
                return  # whatever the app made of the aborted body (a 400 parse error), ours is the answer
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            pass
        finally:
            if exceeded and not status["sent"]:
                await self._too_large(scope, receive, send, request_id, received)
                status["code"] = 413
            self._record(scope, int(status["code"]), started)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                         size: int) -> None:
        refusal = PayloadTooLarge(
            f"the request body is over the limit of {self.body_limit} bytes (given: at least {size}); send a "
            "smaller image or raise PALIGEMMA_MAX_IMAGE_BYTES",
            param="image", headers={"connection": "close", "x-request-id": request_id},
        )
        await service_error_response(refusal, request_id)(scope, receive, send)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        path = scope.get("path", "")
        if not path.startswith(_TASK_PREFIX):
            return
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if status < 400:
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
