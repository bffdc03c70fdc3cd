"""Optional OpenTelemetry traces: a span per request, and under it the engine's phases.

Off by default (PALIGEMMA_TRACING). The request span is FastAPI's own server span (its native
OpenTelemetry support, given our tracer provider): it continues a caller's `traceparent`, is named
`POST /v1/caption`, and covers everything the app answers, refusals by middleware included.

The engine runs in a worker thread, where no span is created: it only records monotonic timestamps on
each request (queued, admitted, first token, finished). When the request is answered, the service calls
`record_request_spans`, which makes the phase spans with explicit start and end times under the
current (request) span:

    POST /v1/caption                  FastAPI's server span
    └── <name>                        the request's time in the service (attributes: task, tokens...)
        ├── prepare                   decoding and resizing the image (when given)
        ├── queue_wait                submitted -> admitted (given a KV-cache row)
        ├── prefill                   admitted -> first token
        ├── decode                    first token -> finished
        └── postprocess               parsing, masks

This module imports without opentelemetry installed; then tracing cannot be turned on (settings refuse
it) and `record_request_spans(None, ...)` does nothing.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app import __version__

if TYPE_CHECKING:
    from app.settings import Settings

SERVICE_NAME = "paligemma-server"
INSTRUMENTATION = "paligemma_server"

AttributeValue = str | bool | int | float


@dataclass(frozen=True)
class Phase:
    name: str
    start: float  # monotonic seconds
    end: float


def phases(submitted_at: float, admitted_at: float | None, first_token_at: float | None,
           finished_at: float | None, postprocess_start: float | None = None,
           postprocess_end: float | None = None, prepare_start: float | None = None,
           prepare_end: float | None = None) -> list[Phase]:
    """The phases a request went through, from the timestamps it got. A request dropped while queued has
    only `queue_wait` (until it was dropped: `finished_at`); one dropped while running ends its last
    phase at `finished_at`. A timestamp left as None ends the chain there."""
    found = []
    if prepare_start is not None and prepare_end is not None:
        found.append(Phase("prepare", prepare_start, prepare_end))
    marks = [("queue_wait", submitted_at), ("prefill", admitted_at), ("decode", first_token_at),
             ("", finished_at)]
    for (name, start), (_, following) in itertools.pairwise(marks):
        end = following if following is not None else finished_at
        if start is None or end is None:
            break
        found.append(Phase(name, start, max(start, end)))
        if following is None:
            break
    if postprocess_start is not None and postprocess_end is not None:
        found.append(Phase("postprocess", postprocess_start, max(postprocess_start, postprocess_end)))
    return found


def _epoch_ns(offset_ns: int, monotonic_s: float) -> int:
    return offset_ns + round(monotonic_s * 1e9)


def record_request_spans(tracer: Any, name: str, attributes: Mapping[str, AttributeValue],
                         submitted_at: float, admitted_at: float | None, first_token_at: float | None,
                         finished_at: float | None, postprocess_start: float | None = None,
                         postprocess_end: float | None = None, *, prepare_start: float | None = None,
                         prepare_end: float | None = None, error: str | None = None,
                         context: Any = None) -> None:
    """Make the span `name` and one child per phase, from monotonic timestamps (time.monotonic()).

    Call it on the event loop after the request is answered (or failed: pass `error`), where the request
    span is current; `context` (an opentelemetry Context) names another parent. `tracer` None (tracing
    off) does nothing.
    """
    if tracer is None:
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    steps = phases(submitted_at, admitted_at, first_token_at, finished_at, postprocess_start,
                   postprocess_end, prepare_start, prepare_end)
    # One reading of both clocks converts every timestamp: the spans keep their exact relative times.
    offset_ns = time.time_ns() - time.monotonic_ns()
    start = min([submitted_at, *(p.start for p in steps)])
    end = max([submitted_at, *(p.end for p in steps)])
    span = tracer.start_span(name, context=context, kind=SpanKind.INTERNAL, attributes=dict(attributes),
                             start_time=_epoch_ns(offset_ns, start))
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    from opentelemetry import trace

    parent = trace.set_span_in_context(span, context)
    for phase in steps:
        child = tracer.start_span(phase.name, context=parent, kind=SpanKind.INTERNAL,
                                  start_time=_epoch_ns(offset_ns, phase.start))
        child.end(end_time=_epoch_ns(offset_ns, phase.end))
    span.end(end_time=_epoch_ns(offset_ns, end))


def current_span() -> Any:
    """The span being recorded now (the request span, in middleware), or None: no tracing, or this
    request is not sampled."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


class Tracing:
    """A tracer provider owned by one app: its tracer, FastAPI's configuration, and its shutdown."""

    def __init__(self, provider: Any):
        self.provider = provider
        self.tracer = provider.get_tracer(INSTRUMENTATION, __version__)

    @classmethod
    def with_exporter(cls, exporter: Any, batch: bool = True) -> Tracing:
        """Spans go to `exporter`: in batches (for a network exporter), or each as it ends (tests)."""
        from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; our name only fills a gap.
        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
        provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER applies
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        return cls(provider)

    def fastapi_config(self) -> dict[str, Any]:
        """`FastAPI(telemetry=...)`: request spans from our provider; FastAPI's OpenTelemetry metrics and
        logs stay off (Prometheus and the log have those)."""
        return {"tracer_provider": self.provider, "tracing": True, "metrics": False, "logs": False}

    def shutdown(self) -> None:
        """Export what is buffered, then stop."""
        self.provider.shutdown()


# What FastAPI gets when tracing is off: no spans, no OpenTelemetry metrics or logs, even where a global
# provider was set up by someone else.
TELEMETRY_OFF: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}


def tracing_from_settings(settings: Settings) -> Tracing | None:
    """PALIGEMMA_TRACING's choice of exporter (settings checked that its packages are installed)."""
    if settings.tracing == "off" or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if settings.tracing == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return Tracing.with_exporter(ConsoleSpanExporter())
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT... itself.
    return Tracing.with_exporter(OTLPSpanExporter())
