"""Annotated PNGs from /v1/detect and /v1/segment: asked for with `Accept: image/png` or `render=true`.

Two hooks for the task routes: `wants_image` (decides, and refuses before any model work when the
drawing library is missing) and `annotated_png` (draws the finished result). The drawing
itself is `app.api.render`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api import render
from app.errors import RenderingUnavailable
from app.serving.jobs import JobResult
from app.serving.service import InferenceService

PNG = "image/png"

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {PNG: {}},
          "description": "JSON; or, with `Accept: image/png` or `render=true`, the image with the results "
                         "drawn."},
    501: {"description": "An annotated image was asked for, but the server has no drawing library "
                         "(install the `render` extra)."},
}


def prefers_png(accept: str) -> bool:
    """Whether an Accept header ranks image/png above JSON (ties, `*/*` and no header: JSON)."""
    quality: dict[str, float] = {}
    for part in accept.split(","):
        media_type, *params = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media_type = media_type.lower()
        quality[media_type] = max(q, quality.get(media_type, 0.0))
    png = quality.get(PNG, quality.get("image/*", 0.0))
    json = max(quality.get(name, 0.0) for name in ("application/json", "application/*", "*/*"))
    return png > json


def wants_image(request: Request, render_field: bool) -> bool:
    """Whether to answer with a PNG (the `render` field, or an Accept header that ranks it first);
    refused before any model work when the drawing library is missing."""
    if not (render_field or prefers_png(request.headers.get("accept", ""))):
        return False
    if not render.available():
        raise RenderingUnavailable(
            "annotated images need the `supervision` package, which this server does not have; install "
            "the render extra (pip install 'paligemma-server[render]') or ask for JSON", param="render")
    return True


async def annotated_png(data: bytes, result: JobResult, service: InferenceService) -> Response:
    """The uploaded image with `result`'s objects drawn. Drawing runs off the event loop (CPU work)."""
    limit = service.settings.max_image_pixels
    png = await run_in_threadpool(render.render_png, data, result.objects or [], limit)
    return Response(png, media_type=PNG)
