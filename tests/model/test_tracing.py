"""OpenTelemetry traces: the engine's phases as child spans from monotonic timestamps, the request span
from FastAPI, and nothing at all (and no import) when tracing is off."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.main import create_app
from app.settings import Settings
from app.tracing import Phase, Tracing, phases, record_request_spans
from tests.helpers import files, serve
from tests.images import jpeg

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _in_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing.with_exporter(exporter, batch=False), exporter


# ------------------------------------------------------------------------------------------ phases
def test_phases_of_a_request_that_ran_to_the_end():
    assert phases(1.0, 1.5, 2.0, 4.0, 4.0, 4.25, prepare_start=0.5, prepare_end=1.0) == [
        Phase("prepare", 0.5, 1.0), Phase("queue_wait", 1.0, 1.5), Phase("prefill", 1.5, 2.0),
        Phase("decode", 2.0, 4.0), Phase("postprocess", 4.0, 4.25)]


def test_phases_of_requests_dropped_on_the_way():
    # Dropped (timeout, disconnect) while queued: queue_wait runs until it was dropped.
    assert phases(1.0, None, None, 3.0) == [Phase("queue_wait", 1.0, 3.0)]
    # Dropped during its prefill step.
    assert phases(1.0, 1.5, None, 1.75) == [Phase("queue_wait", 1.0, 1.5), Phase("prefill", 1.5, 1.75)]
    # Not finished (yet): no phase is made up.
    assert phases(1.0, 1.5, 2.0, None) == [Phase("queue_wait", 1.0, 1.5), Phase("prefill", 1.5, 2.0)]
    assert phases(1.0, None, None, None) == []
    # Clocks read on different threads never give a span a negative length.
    assert phases(1.0, 0.999, 2.0, 2.0) == [Phase("queue_wait", 1.0, 1.0), Phase("prefill", 0.999, 2.0),
                                            Phase("decode", 2.0, 2.0)]


# ---------------------------------------------------------------------------- record_request_spans
def _timeline() -> dict[str, float]:
    """Real monotonic timestamps of a request's life, a few milliseconds apart."""
    marks = {}
    for name in ("prepare_start", "submitted_at", "admitted_at", "first_token_at", "finished_at",
                 "postprocess_end"):
        marks[name] = time.monotonic()
        time.sleep(0.004)
    return marks


def test_the_span_tree_under_the_request_span_with_real_timestamps():
    tracing, exporter = _in_memory()
    t = _timeline()
    with tracing.tracer.start_as_current_span("POST /v1/caption") as request_span:
        wall_before, mono_before = time.time_ns(), time.monotonic()
        record_request_spans(tracing.tracer, "paligemma.caption", {"paligemma.task": "caption",
                                                                  "paligemma.completion_tokens": 7},
                             t["submitted_at"], t["admitted_at"], t["first_token_at"], t["finished_at"],
                             t["finished_at"], t["postprocess_end"], prepare_start=t["prepare_start"],
                             prepare_end=t["submitted_at"])
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/caption", "paligemma.caption", "prepare", "queue_wait", "prefill", "decode",
                          "postprocess"}
    inference = spans["paligemma.caption"]
    assert inference.parent.span_id == request_span.get_span_context().span_id
    assert dict(inference.attributes) == {"paligemma.task": "caption", "paligemma.completion_tokens": 7}
    children = sorted((s for s in spans.values() if s.parent and s.parent.span_id == inference.context.span_id),
                      key=lambda s: s.start_time)
    assert [s.name for s in children] == ["prepare", "queue_wait", "prefill", "decode", "postprocess"]
    # Each phase is exactly as long as its timestamps say, the phases follow one another without gaps,
    # and the parent spans from the first to the last.
    bounds = [("prepare_start", "submitted_at"), ("submitted_at", "admitted_at"), ("admitted_at", "first_token_at"),
              ("first_token_at", "finished_at"), ("finished_at", "postprocess_end")]
    for span, (start, end) in zip(children, bounds, strict=True):
        assert abs((span.end_time - span.start_time) - (t[end] - t[start]) * 1e9) < 2_000, span.name
        assert span.end_time - span.start_time >= 3_000_000  # each phase slept 4 ms
    for before, after in itertools.pairwise(children):
        assert abs(after.start_time - before.end_time) < 2_000
    assert (inference.start_time, inference.end_time) == (children[0].start_time, children[-1].end_time)
    # Monotonic seconds became wall-clock nanoseconds: the first phase began when the timeline did.
    expected_start = wall_before - (mono_before - t["prepare_start"]) * 1e9
    assert abs(inference.start_time - expected_start) < 5_000_000


def test_a_failed_request_marks_its_span():
    tracing, exporter = _in_memory()
    t = _timeline()
    record_request_spans(tracing.tracer, "paligemma.caption", {}, t["submitted_at"], None, None,
                         t["finished_at"], error="timeout: waited longer than PALIGEMMA_REQUEST_TIMEOUT_S")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"paligemma.caption", "queue_wait"}
    assert spans["paligemma.caption"].status.status_code is trace.StatusCode.ERROR
    assert "timeout" in spans["paligemma.caption"].status.description
    assert spans["paligemma.caption"].parent is None  # no request span current: a root span


def test_an_explicit_parent_context():
    tracing, exporter = _in_memory()
    with tracing.tracer.start_as_current_span("request") as request_span:
        parent = trace.set_span_in_context(request_span)
    t = _timeline()
    record_request_spans(tracing.tracer, "work", {}, t["submitted_at"], t["admitted_at"], t["first_token_at"],
                         t["finished_at"], context=parent)
    [work] = [s for s in exporter.get_finished_spans() if s.name == "work"]
    assert work.parent.span_id == request_span.get_span_context().span_id


def test_tracing_off_records_nothing():
    t = _timeline()
    assert record_request_spans(None, "x", {}, t["submitted_at"], t["admitted_at"], t["first_token_at"],
                                t["finished_at"]) is None


# ------------------------------------------------------------------------------- through the app
def test_request_spans_from_the_app_with_the_phases_under_them():
    tracing, exporter = _in_memory()
    app = create_app(Settings(api_keys=("k1",), max_image_bytes=2048, max_request_bytes=4096), tracing=tracing)

    # Where the service will call it: on the event loop, inside the route's handling.
    async def probe() -> dict[str, bool]:
        t = time.monotonic()
        record_request_spans(app.state.tracer, "paligemma.probe", {}, t - 0.04, t - 0.03, t - 0.02, t - 0.01,
                             t - 0.01, t)
        return {"ok": True}

    app.add_api_route("/v1/probe", probe, methods=["GET"])
    with serve(app=app, ready=False) as c:
        key = {"Authorization": "Bearer k1", "X-Request-ID": "trace-me"}
        assert c.get("/v1/probe", headers={**key, "traceparent": TRACEPARENT}).status_code == 200
        assert c.post("/v1/caption", files=files(jpeg(32, 32))).status_code == 401
        assert c.post("/v1/detect", content=b"x" * 10_000, headers={
            **key, "content-type": "multipart/form-data; boundary=zz"}).status_code == 413
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    server = by_name["GET /v1/probe"]
    assert server.kind is trace.SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACEPARENT.split("-")[1]  # the caller's trace goes on
    assert server.attributes["http.route"] == "/v1/probe" and server.attributes["paligemma.request_id"] == "trace-me"
    assert dict(server.resource.attributes)["service.name"] == "paligemma-server"

    def ancestors(span):
        ids = {s.context.span_id: s for s in spans}
        while span.parent is not None and span.parent.span_id in ids:
            span = ids[span.parent.span_id]
            yield span.name

    assert "GET /v1/probe" in list(ancestors(by_name["paligemma.probe"]))
    assert next(ancestors(by_name["decode"])) == "paligemma.probe"
    # Refused by middleware before routing, still named by their route.
    for name, status in (("POST /v1/caption", 401), ("POST /v1/detect", 413)):
        assert by_name[name].attributes["http.response.status_code"] == status
        assert by_name[name].attributes["http.route"] == name.split(" ")[1]


def test_off_means_no_spans_even_where_a_global_provider_is_set():
    """Someone else's global provider (zero-code instrumentation, say) gets no spans from this app while
    PALIGEMMA_TRACING is off. In a subprocess: the global provider can be set once per process."""
    script = textwrap.dedent("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from fastapi.testclient import TestClient
        from app.main import create_app
        from app.settings import Settings

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        app = create_app(Settings())
        assert app.state.tracing is None and app.state.tracer is None
        client = TestClient(app)  # no lifespan: no model is loaded
        assert client.get("/healthz").status_code == 200 and client.get("/nothing").status_code == 404
        with trace.get_tracer("check").start_as_current_span("probe"):
            pass
        assert [s.name for s in exporter.get_finished_spans()] == ["probe"], exporter.get_finished_spans()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ------------------------------------------------------------------------- without opentelemetry
BLOCK_OPENTELEMETRY = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
"""


def test_the_module_imports_and_does_nothing_without_opentelemetry():
    script = BLOCK_OPENTELEMETRY + textwrap.dedent("""
        import time
        from app import tracing
        from app.settings import load_settings, SettingsError

        t = time.monotonic()
        assert tracing.record_request_spans(None, "x", {}, t, t, t, t) is None
        assert tracing.current_span() is None
        assert load_settings().tracing == "off"
        for choice, extra in (("console", "otel"), ("otlp", "otlp")):
            try:
                load_settings(tracing=choice)
            except SettingsError as exc:
                assert f"PALIGEMMA_TRACING: " in str(exc) and f"paligemma-server[{extra}]" in str(exc), exc
            else:
                raise AssertionError("tracing turned on without opentelemetry")
        assert not any(name.startswith("opentelemetry") for name in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("choice", ["console", "otlp"])
def test_each_exporter_is_built_from_the_settings(choice, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pg-test")
    from app.tracing import tracing_from_settings

    tracing = tracing_from_settings(Settings(tracing=choice))
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == "pg-test"  # OTEL_* still apply
    finally:
        tracing.shutdown()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing_from_settings(Settings(tracing=choice)) is None


def test_a_real_request_records_its_phases_under_its_request_span():
    tracing, exporter = _in_memory()
    app = create_app(Settings(default_max_new_tokens=6), tracing=tracing)
    with serve(app=app) as c:
        assert c.post("/v1/caption", files=files(jpeg(64, 48))).status_code == 200
        assert c.post("/v1/vqa", json={"image": "not base64!", "question": "q"}).status_code == 400
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    job = by_name["paligemma.caption"]
    ids = {s.context.span_id: s for s in spans}
    parents, span = [], job
    while span.parent is not None and span.parent.span_id in ids:
        span = ids[span.parent.span_id]
        parents.append(span.name)
    assert "POST /v1/caption" in parents  # inside the request's own span
    children = sorted((s for s in spans if s.parent is not None and s.parent.span_id == job.context.span_id),
                      key=lambda s: s.start_time)
    assert [s.name for s in children] == ["prepare", "queue_wait", "prefill", "decode", "postprocess"]
    for earlier, later in itertools.pairwise(children):
        assert earlier.end_time <= later.start_time + 1000  # in order, each where the last one ended
    assert job.attributes["paligemma.completion_tokens"] == 6
    assert not any(s.name.startswith("paligemma.") and s.name != "paligemma.caption" for s in spans)  # no warm-up
