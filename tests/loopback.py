"""An HTTP server of the standard library on a loopback port, in a thread, for tests that need one to
talk to (an image host, say). Always shut down, its handler threads joined."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def loopback_server(handler: type[http.server.BaseHTTPRequestHandler],
                    tls: ssl.SSLContext | None = None) -> Iterator[http.server.ThreadingHTTPServer]:
    """Serve `handler` on 127.0.0.1 (a free port: `server.server_address[1]`), over TLS if given."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=f"{handler.__name__}-server")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()  # joins the handler threads (block_on_close)
        thread.join()
