"""API keys, checked before the request body is read (a refused client uploads nothing).

A key comes as `Authorization: Bearer <key>` or as `X-API-Key: <key>` (what most API gateways and
OpenAI-style clients send). Hand-written ASGI middleware rather than FastAPI's security dependencies:
dependencies run after the body is parsed, so a refused client would have uploaded its whole image first.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import request_id_of, service_error_response
from app.errors import Unauthorized

API_KEY_HEADER = "X-API-Key"
HOW_TO_SEND = f"send `Authorization: Bearer <key>` or `{API_KEY_HEADER}: <key>`"

# Declared on the routes for the OpenAPI document only (either one will do); enforcement is the
# middleware below.
bearer_scheme = HTTPBearer(auto_error=False, description="One of the keys in PALIGEMMA_API_KEYS.")
api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="One of the keys in PALIGEMMA_API_KEYS (instead of Bearer).")


@dataclass(frozen=True)
class Credentials:
    keys: tuple[str, ...]  # what the request presented, in either header
    problem: str | None  # why a header that was sent holds no usable key


def presented_credentials(authorization: str | None, api_key: str | None) -> Credentials:
    keys: list[str] = []
    problem = None
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer":
            if token:
                keys.append(token)
            else:
                problem = "the Authorization header's Bearer token is empty"
        elif not token:
            # `Authorization: <key>`: a key (or an empty header) with no scheme.
            problem = "the Authorization header has no `Bearer` scheme"
        else:
            problem = f"the Authorization header's scheme is {scheme[:16]!r}, not Bearer"
    if api_key is not None:
        if api_key.strip():
            keys.append(api_key.strip())
        else:
            problem = problem or f"the {API_KEY_HEADER} header is empty"
    return Credentials(tuple(keys), problem)


def key_is_valid(presented: tuple[str, ...], keys: tuple[str, ...]) -> bool:
    """Compare every presented key with every configured one, always, in constant time: timing reveals
    neither a key nor its position."""
    matched = False
    for candidate in presented:
        for key in keys:
            matched |= hmac.compare_digest(candidate.encode(), key.encode())
    return matched


def refusal_message(credentials: Credentials) -> str:
    reason = "API key not valid" if credentials.keys else credentials.problem or "API key missing"
    return f"{reason}; {HOW_TO_SEND} (keys are set by PALIGEMMA_API_KEYS)"


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
        headers = {name: value.decode("latin-1") for name, value in scope.get("headers", [])
                   if name in (b"authorization", b"x-api-key")}
        credentials = presented_credentials(headers.get(b"authorization"), headers.get(b"x-api-key"))
        if key_is_valid(credentials.keys, self.keys):
            await self.app(scope, receive, send)
            return
        refusal = Unauthorized(refusal_message(credentials),
                               headers={"WWW-Authenticate": 'Bearer realm="paligemma"'})
        await service_error_response(refusal, request_id_of(scope))(scope, receive, send)
