"""Pages for people: a start page, the playground, and Swagger UI served with no network.

Everything a page loads comes from this server: the playground's plain HTML/CSS/JS (app/static, no
build step) and Swagger UI's assets from the `swagger-ui-bundle-v2` package, so `/docs` also works on a
site with no way out to a CDN. Paths in the pages are relative, so they also work behind a path prefix.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

STATIC = Path(__file__).resolve().parents[1] / "static"
SWAGGER_ASSETS = "/static/swagger-ui"

# The playground talks to this server only; images it shows are local files (blob:) or canvases.
PLAYGROUND_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                  "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def start_page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/playground")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "playground" / "index.html",
                        headers={"Content-Security-Policy": PLAYGROUND_CSP})


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=root + (request.app.openapi_url or "/openapi.json"),
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{root}{SWAGGER_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER_ASSETS}/favicon-32x32.png",
        oauth2_redirect_url=None,
    )


def install(app: FastAPI) -> None:
    """Add the pages and their static files. The app must be created with `docs_url=None`."""
    app.include_router(router)
    # The more specific mount first: routes match in order.
    app.mount(SWAGGER_ASSETS, StaticFiles(directory=swagger_ui_path), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
