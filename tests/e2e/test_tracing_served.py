"""PALIGEMMA_TRACING=otlp: a served process sends its request spans over OTLP/HTTP to a local receiver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.images import jpeg
from tests.served import served

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Receiver:
    """The trace half of an OpenTelemetry collector's OTLP/HTTP receiver, on a loopback port."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    receiver.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[tuple[dict, object]]:
        """(resource attributes, span) for every span received."""
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    found += [(resource, span) for span in scope_spans.spans]
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(timeout=10)


def test_request_spans_reach_an_otlp_receiver(tmp_path, receiver):
    env = {"PALIGEMMA_TRACING": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.url}/v1/traces",
           "OTEL_BSP_SCHEDULE_DELAY": "100", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "PALIGEMMA_DEFAULT_MAX_NEW_TOKENS": "2"}
    with served(tmp_path, env=env) as server:
        response = httpx.post(f"{server.url}/v1/caption", files={"image": ("a.jpg", jpeg(64, 48), "image/jpeg")},
                              headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
                                       "X-Request-ID": "otlp-1"}, timeout=60)
        assert response.status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                span.name == "POST /v1/caption" for _, span in receiver.spans()):
            time.sleep(0.1)
        assert server.terminate() == 0
    [(resource, span)] = [(r, s) for r, s in receiver.spans() if s.name == "POST /v1/caption"]
    assert resource["service.name"] == "paligemma-server"
    assert span.trace_id.hex() == TRACE_ID
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["paligemma.request_id"].string_value == "otlp-1"
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["http.route"].string_value == "/v1/caption"
