"""Stands in for the `prometheus` binary in one test: it answers every request the way a real Prometheus
does while it opens its storage (503, "Service Unavailable", plain text) for STARTING_S seconds, then
says it is ready and answers queries for `up` with one series. Run as
`python starting_prometheus.py --web.listen-address=127.0.0.1:PORT [other flags, ignored]`."""

from __future__ import annotations

import http.server
import json
import sys
import time

STARTING_S = 1.5
UP = {"status": "success", "data": {"resultType": "vector", "result": [
    {"metric": {"__name__": "up", "job": "paligemma-server", "instance": "127.0.0.2:8000"},
     "value": [0, "0"]}]}}
started = time.monotonic()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if time.monotonic() - started < STARTING_S:
            self._answer(503, b"Service Unavailable", "text/plain; charset=utf-8")
        elif self.path == "/-/ready":
            self._answer(200, b"Prometheus Server is Ready.\n", "text/plain; charset=utf-8")
        else:
            self._answer(200, json.dumps(UP).encode(), "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    address = next(arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--web.listen-address="))
    host, port = address.rsplit(":", 1)
    http.server.ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
