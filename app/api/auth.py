"""Bearer API keys, checked before the request body is read (a refused client uploads nothing).

Hand-written ASGI middleware rather than FastAPI's `HTTPBearer` dependency: dependencies run after the
body is parsed, so a refused client would have uploaded its whole image first.
"""

from __future__ import annotations

import hmac

from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import request_id_of, service_error_response
from app.errors import Unauthorized

# Declared on the routes for the OpenAPI document only; enforcement is the middleware below.
bearer_scheme = HTTPBearer(auto_error=False, description="One of the keys in PALIGEMMA_API_KEYS.")


def presented_key(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_is_valid(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Compare against every key, always, in constant time: timing reveals neither key nor position."""
    matched = False
    if presented is not None:
        for key in keys:
            matched |= hmac.compare_digest(presented.encode(), key.encode())
    return matched


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...], protect_metrics: bool):
        self.app = app
        self.keys = keys
        self.protect_metrics = protect_metrics

    def _protected(self, path: str) -> bool:
        return path.startswith("/v1/") or (self.protect_metrics and path == "/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not self._protected(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        presented = presented_key(headers.get(b"authorization", b"").decode("latin-1"))
        if key_is_valid(presented, self.keys):
            await self.app(scope, receive, send)
            return
        reason = "missing" if presented is None else "not valid"
        refusal = Unauthorized(
            f"API key {reason}: send `Authorization: Bearer <key>` (keys are set by PALIGEMMA_API_KEYS)",
            headers={"WWW-Authenticate": 'Bearer realm="paligemma"'},
        )
        await service_error_response(refusal, request_id_of(scope))(scope, receive, send)
