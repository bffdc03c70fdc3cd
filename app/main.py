"""The app factory and its lifespan: load, warm up, start, mark ready; on the way down drain and release."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from app import __version__
from app.api import adapters, openai_chat, ops, pages, tasks
from app.api.auth import ApiKeyMiddleware, api_key_scheme, bearer_scheme
from app.api.draining import DrainingUploadsMiddleware
from app.api.errors import install_error_handlers
from app.api.limits import BodyLimitMiddleware
from app.api.middleware import REQUEST_ID_HEADER, RequestContextMiddleware
from app.engine.memory_plan import MemoryPlan
from app.engine.model_thread import ModelThread
from app.lifecycle import Lifecycle, StartupError
from app.metrics import Metrics
from app.model.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from app.plan import startup_plan
from app.serving.service import InferenceService, RunnerFactory
from app.settings import Settings, load_settings
from app.sizes import gib
from app.tracing import TELEMETRY_OFF, Tracing, tracing_from_settings

logger = logging.getLogger(__name__)

DESCRIPTION = """Google's PaliGemma behind typed endpoints: captions, answers, OCR text, boxes in pixels and
decoded masks, with requests batched onto one model worker."""


def _load_mask_decoder(settings: Settings, loaded: LoadedModel):
    """PALIGEMMA_MASK_DECODER when set, else the checkpoint's own decoder (the demo's), else none."""
    path = settings.mask_decoder or loaded.bundled_mask_decoder
    if path is None:
        return None
    from app.masks.decoder import load_mask_decoder

    return load_mask_decoder(path, loaded.device, bundled=settings.mask_decoder is None)


async def _bring_up(app: FastAPI) -> None:
    """Load the model (off the event loop), warm it up with one real batch, then declare ready."""
    settings: Settings = app.state.settings
    lifecycle: Lifecycle = app.state.lifecycle
    metrics: Metrics = app.state.metrics
    try:
        # Everything that touches the model runs on this one thread (app.engine.model_thread says why).
        model_thread = app.state.model_thread = ModelThread()
        device = resolve_device(settings.device)
        # What the model will take, before any weight is loaded: refuse now, with the table, if it cannot fit.
        app.state.memory_plan = await model_thread.run(
            startup_plan, settings, device, resolve_dtype(settings.dtype, device))
        loaded = await model_thread.run(load_model, settings, device)
        decoder = await model_thread.run(_load_mask_decoder, settings, loaded)
        def worker_died(exc: BaseException) -> None:
            lifecycle.fail(f"model worker failed: {exc!r}")
            metrics.ready.set(0)
            app.state.on_fatal()

        service = await model_thread.run(lambda: InferenceService(
            settings, loaded, metrics, decoder, on_fatal=worker_died, tracer=app.state.tracer,
            **({"runner_factory": app.state.runner_factory} if app.state.runner_factory else {})))
        if service.adapters is not None:
            service.adapters.on_unloaded = metrics.forget_adapter
        await service.start(model_thread)
        metrics.decode_graphs_failed.set(1 if service.decode_graphs_failure else 0)
        app.state.service = service
        _log_measured(app.state.memory_plan, loaded.weight_bytes,
                      getattr(service.runner, "cache_bytes", None),
                      service.adapters.bank.bytes if service.adapters is not None else None)
        await service.warm_up()
    except StartupError as exc:
        # The message says what is wrong and what to do; the process's exit line shows it once.
        logger.debug("start-up failed", exc_info=exc)
        lifecycle.fail(f"start-up failed: {exc}")
        app.state.on_fatal()
        return
    except Exception as exc:
        logger.exception("start-up failed")
        lifecycle.fail(f"start-up failed: {exc}")
        app.state.on_fatal()
        return
    metrics.model_info.labels(loaded.name, str(loaded.dtype).removeprefix("torch."), str(loaded.device),
                              str(loaded.random_weights).lower(), str(service.masks_enabled).lower()).set(1)
    lifecycle.mark_ready()
    metrics.ready.set(1 if lifecycle.ready else 0)
    logger.info("ready: serving %s", loaded.name)


def _log_measured(plan: MemoryPlan | None, weights: int, cache: int | None, adapters: int | None) -> None:
    if plan is None:
        return
    slots = (f", adapter slots {gib(adapters)} measured ({gib(plan.adapter_bytes)} planned)"
             if adapters is not None else "")
    logger.info("memory: weights %s measured (%s planned), KV cache %s measured (%s planned)%s", gib(weights),
                gib(plan.weight_bytes), gib(cache), gib(plan.cache_bytes), slots)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    bring_up = asyncio.create_task(_bring_up(app), name="bring-up")
    app.state.bring_up = bring_up
    try:
        yield
    finally:
        lifecycle: Lifecycle = app.state.lifecycle
        lifecycle.begin_drain(app.state.settings.drain_timeout_s)
        app.state.metrics.ready.set(0)
        if not bring_up.done():
            bring_up.cancel()
            await asyncio.gather(bring_up, return_exceptions=True)
        service: InferenceService | None = app.state.service
        if service is not None:
            # Whatever is left of the drain: the signal handler usually spent it already.
            remaining = max(0.0, (lifecycle.drain_deadline or 0) - time.monotonic())
            await service.stop(remaining)
        if app.state.model_thread is not None:
            app.state.model_thread.close()
        if app.state.tracing is not None:
            await asyncio.to_thread(app.state.tracing.shutdown)  # exports what is still buffered
        logger.info("stopped")


def create_app(settings: Settings | None = None, on_fatal: Callable[[], None] | None = None,
               runner_factory: RunnerFactory | None = None, tracing: Tracing | None = None) -> FastAPI:
    """Build the app. Nothing heavy happens here: the model loads in the lifespan.

    `runner_factory` replaces the model side of the engine (tests hand in fakes and fault injectors);
    `tracing` replaces the tracer provider PALIGEMMA_TRACING would make (tests hand in an in-memory one).
    """
    settings = settings or load_settings()
    tracing = tracing or tracing_from_settings(settings)
    # /docs is served by app.api.pages from local assets (FastAPI's default loads them from a CDN).
    # Request spans are FastAPI's own (app.tracing says why), from our provider or none at all.
    app = FastAPI(title="PaliGemma server", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  telemetry=tracing.fastapi_config() if tracing else TELEMETRY_OFF)  # type: ignore[arg-type]
    app.state.settings = settings
    app.state.tracing = tracing
    app.state.tracer = tracing.tracer if tracing else None  # for record_request_spans; None: tracing off
    app.state.metrics = Metrics()
    app.state.lifecycle = Lifecycle()
    app.state.service = None
    app.state.memory_plan = None  # set before the model loads (app.plan)
    app.state.model_thread = None  # set when the model starts loading
    app.state.on_fatal = on_fatal or (lambda: None)
    app.state.runner_factory = runner_factory

    install_error_handlers(app)

    @app.exception_handler(tasks.ClientDisconnected)
    async def _client_left(request: Request, exc: Exception) -> Response:
        return tasks.disconnected_response()

    # The OpenAPI document declares the keys only where the middleware enforces them: either scheme will do.
    protected = [Security(bearer_scheme), Security(api_key_scheme)] if settings.api_keys else []
    app.include_router(ops.router)
    app.include_router(ops.metrics_router, dependencies=protected if settings.metrics_require_key else [])
    app.include_router(ops.models_router, dependencies=protected)
    app.include_router(tasks.router, dependencies=protected)
    app.include_router(openai_chat.router, dependencies=protected)
    app.include_router(adapters.router, dependencies=protected)
    pages.install(app)
    # At run time, outermost first: the request context (id, access log, metrics) sees every answer;
    # CORS answers preflights before the key check (browsers send no key with them) and adds its headers
    # to refusals too, so that a page can read them; the body limit refuses before the key check reads.
    # Innermost: an upload still streaming in when the drain begins is answered 503 at once.
    app.add_middleware(DrainingUploadsMiddleware, lifecycle=app.state.lifecycle, metrics=app.state.metrics)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, protect_metrics=settings.metrics_require_key)
    app.add_middleware(BodyLimitMiddleware, body_limit=settings.request_body_limit)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, **cors_options(settings.cors_origins))
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    return app


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    """What browsers on `origins` may do: the API's methods and headers (keys included), and read the
    request id and Retry-After. No cookies are involved, so no credentials mode."""
    return {
        "allow_origins": ["*"] if "*" in origins else list(origins),
        "allow_methods": ["GET", "POST"],
        "allow_headers": ["Authorization", "X-API-Key", "Content-Type", "Accept", REQUEST_ID_HEADER.decode(),
                          "traceparent", "tracestate"],
        "expose_headers": [REQUEST_ID_HEADER.decode(), "Retry-After", "WWW-Authenticate"],
        "max_age": 600,
    }
