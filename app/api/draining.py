"""Requests still sending their body when the drain begins are answered 503 at once, as pure ASGI
middleware.

Such a request was not admitted (admission comes after the body), and once the drain begins nothing new
is: waiting for the rest of an upload would only keep the process up, and the sockets' close would then
cut the client off mid-upload. So the body's next `receive` raises `ShuttingDown` instead, which the app
answers with the usual 503 envelope (and `Connection: close`); a body already read is never interrupted.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ShuttingDown
from app.lifecycle import Lifecycle, unless_draining
from app.metrics import Metrics


class DrainingUploadsMiddleware:
    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, metrics: Metrics):
        self.app = app
        self.lifecycle = lifecycle
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = False

        async def receive_unless_draining() -> Message:
            nonlocal body_read
            if body_read:
                return await receive()
            try:
                message = await unless_draining(receive(), self.lifecycle.draining)
            except ShuttingDown:
                self.metrics.rejected("shutting_down")
                raise
            body_read = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_unless_draining, send)
