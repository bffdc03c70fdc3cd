"""The request-body size limit, as pure ASGI middleware.

It counts bytes while they stream in, so an oversized upload is refused without being read to the end
or held in memory; a declared Content-Length over the limit is refused before any byte. Hand-written
rather than Starlette's RequestBodyLimitMiddleware (FastAPI's `max_body_size`): its 413 says "Content
Too Large" and names neither the limit nor the setting that raises it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import request_id_of, service_error_response
from app.errors import PayloadTooLarge


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, body_limit: int):
        self.app = app
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.body_limit:
            await self._too_large(scope, receive, send, declared)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.body_limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app made of the aborted body (a 400 parse error), ours is the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        finally:
            if exceeded and not started:
                await self._too_large(scope, receive, send, received)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        refusal = PayloadTooLarge(
            f"the request body is over the limit of {self.body_limit} bytes (given: at least {size}); send a "
            "smaller image or raise PALIGEMMA_MAX_IMAGE_BYTES",
            param="image", headers={"connection": "close"},
        )
        await service_error_response(refusal, request_id_of(scope))(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
