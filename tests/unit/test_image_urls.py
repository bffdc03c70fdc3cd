"""app.image_sources fetching image URLs from a real HTTP(S) server on 127.0.0.1.

Names like `images.test` reach that server through a resolver handed in (nothing here asks DNS for a
public name); the default resolver is exercised on `localhost` alone.
"""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.errors import InvalidImage, InvalidRequest, PayloadTooLarge, ServiceError, UpstreamTimeout
from app.image_sources import ImageSources
from app.image_sources.fetch import MAX_REDIRECTS
from app.image_sources.hosts import IPAddress
from app.images import decode_image
from tests.images import jpeg
from tests.loopback import loopback_server

LOOPBACK = ipaddress.ip_address("127.0.0.1")
LIMIT = 64 * 1024
IMAGE = jpeg(96, 64)
TRICKLE_DELAY_S = 0.1


@dataclass
class Served:
    """What the test server saw, for assertions."""

    port: int
    hosts: list[str] = field(default_factory=list)  # Host header of each request, in order
    unfinished: list[str] = field(default_factory=list)  # bodies the server could not finish writing


class _Handler(http.server.BaseHTTPRequestHandler):
    served: Served

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.served.hosts.append(self.headers["Host"])
        route = getattr(self, "route_" + self.path.strip("/").replace("-", "_"), None)
        if route is None:
            self._answer(404, b"not found")
            return
        try:
            route()
        except OSError:  # the client stopped reading and closed the connection
            self.served.unfinished.append(self.path)
            self.close_connection = True

    def _answer(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        named = {"Content-Length": str(len(body))} | {name.replace("_", "-"): value for name, value in headers.items()}
        for name, value in named.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def route_image(self) -> None:
        self._answer(200, IMAGE, Content_Type="image/jpeg")

    def route_echo_host(self) -> None:
        self._answer(200, self.headers["Host"].encode())

    def route_to_image(self) -> None:
        self._answer(302, b"", Location="/image")

    def route_to_other(self) -> None:  # a listed host (see `sources`)
        self._answer(301, b"", Location=f"http://other.test:{self.served.port}/image")

    def route_to_unlisted(self) -> None:
        self._answer(302, b"", Location=f"http://unlisted.test:{self.served.port}/image")

    def route_to_suffix(self) -> None:  # listed through `.cdn.test` only, and it resolves to loopback
        self._answer(307, b"", Location=f"http://a.cdn.test:{self.served.port}/image")

    def route_to_file(self) -> None:
        self._answer(302, b"", Location="file:///etc/passwd")

    def route_loop(self) -> None:
        self._answer(302, b"", Location="/loop")

    def route_two_hops(self) -> None:
        self._answer(302, b"", Location="/to-image")

    def route_big(self) -> None:
        self._answer(200, b"\xff" * (LIMIT + 1))

    def route_at_limit(self) -> None:
        self._answer(200, b"\xff" * LIMIT)

    def route_stream_big(self) -> None:
        # No Content-Length: the body ends when the connection closes (HTTP/1.0). 32 MiB is more than
        # the socket buffers hold, so the write fails unless the client reads all of it.
        self.send_response(200)
        self.end_headers()
        chunk = b"\xff" * (1024 * 1024)
        for _ in range(32):
            self.wfile.write(chunk)

    def route_chunked_big(self) -> None:
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\xff" * (1024 * 1024)
        for _ in range(32):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def route_short_declared(self) -> None:
        # Declares 100 bytes and sends far more than the limit: only the declared bytes are a body.
        self._answer(200, b"\xff" * (4 * LIMIT), Content_Length="100")

    def route_long_declared(self) -> None:
        # Declares more than the limit (and sends little): refused on the header alone.
        self._answer(200, b"\xff" * 10, Content_Length=str(LIMIT * 1000))

    def route_truncated(self) -> None:
        self._answer(200, IMAGE[:100], Content_Length=str(len(IMAGE)))

    def route_trickle(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"\xff")
            self.wfile.flush()
            time.sleep(TRICKLE_DELAY_S)

    def route_gzip(self) -> None:
        self._answer(200, IMAGE, Content_Encoding="gzip")

    def route_empty(self) -> None:
        self._answer(200, b"")

    def route_error(self) -> None:
        self._answer(500, b"boom")


@dataclass
class Server:
    served: Served
    url: str  # http://images.test:PORT


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[Served]:
    handler = type("Handler", (_Handler,), {})
    with loopback_server(handler, tls) as server:
        handler.served = Served(server.server_address[1])
        yield handler.served


@pytest.fixture
def served() -> Iterator[Served]:
    yield from _serve()


class Resolver:
    """`*.test` names -> 127.0.0.1, recording each lookup; anything else fails like an unknown name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append(host)
        if not host.endswith(".test"):
            raise OSError(f"{host}: unknown in this test")
        return [LOOPBACK]


def sources(port: int, resolver: Resolver | None = None, **options: object) -> ImageSources:
    hosts = [f"images.test:{port}", f"other.test:{port}", f".cdn.test:{port}"]
    settings = {"max_bytes": LIMIT, "url_hosts": hosts, "url_timeout_s": 5.0, **options}
    return ImageSources(resolver=resolver or Resolver(), **settings)  # type: ignore[arg-type]


def fetch(source: ImageSources, url: str) -> bytes:
    return asyncio.run(source.load(url))


def refused(source: ImageSources, url: str, error: type[ServiceError]) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        fetch(source, url)
    assert type(caught.value) is error, caught.value.message
    assert caught.value.param == "image"
    return caught.value


def test_fetches_the_image_from_a_listed_host_connecting_to_the_checked_address(served: Served) -> None:
    resolver = Resolver()
    data = fetch(sources(served.port, resolver), f"http://images.test:{served.port}/image")
    assert data == IMAGE
    assert decode_image(data, max_pixels=10**6).width == 96
    assert resolver.calls == ["images.test"]  # one lookup, and the connection went to its answer
    assert served.hosts == [f"images.test:{served.port}"]  # the name travels in the Host header


def test_the_system_resolver_on_localhost(served: Served) -> None:
    # localhost may resolve to ::1 first, where nothing listens: the next checked address is tried.
    source = ImageSources(max_bytes=LIMIT, url_hosts=[f"localhost:{served.port}"])
    assert fetch(source, f"http://localhost:{served.port}/image") == IMAGE


def test_an_ip_literal_listed_exactly_is_fetched_without_a_lookup(served: Served) -> None:
    resolver = Resolver()
    source = ImageSources(max_bytes=LIMIT, url_hosts=[f"127.0.0.1:{served.port}"], resolver=resolver)
    assert fetch(source, f"http://127.0.0.1:{served.port}/image") == IMAGE
    assert resolver.calls == []


def test_redirects_within_the_list_are_followed_and_each_target_is_checked(served: Served) -> None:
    resolver = Resolver()
    source = sources(served.port, resolver)
    assert fetch(source, f"http://images.test:{served.port}/two-hops") == IMAGE
    assert fetch(source, f"http://images.test:{served.port}/to-other") == IMAGE
    assert served.hosts[-2:] == [f"images.test:{served.port}", f"other.test:{served.port}"]
    assert resolver.calls[-2:] == ["images.test", "other.test"]


@pytest.mark.parametrize(("path", "message"), [
    ("to-unlisted", "points to unlisted.test on port"),
    ("to-suffix", "a loopback address"),  # `.cdn.test` lists it, but not exactly
    ("to-file", "scheme 'file'"),
])
def test_a_redirect_off_the_policy_is_refused_before_it_is_followed(served: Served, path: str,
                                                                    message: str) -> None:
    error = refused(sources(served.port), f"http://images.test:{served.port}/{path}", InvalidRequest)
    assert message in error.message
    assert "redirected from" in error.message
    assert served.hosts == [f"images.test:{served.port}"]  # nothing was requested from the target


def test_a_redirect_loop_stops_after_the_limit(served: Served) -> None:
    error = refused(sources(served.port), f"http://images.test:{served.port}/loop", InvalidImage)
    assert f"more than {MAX_REDIRECTS} times" in error.message
    assert len(served.hosts) == MAX_REDIRECTS + 1


@pytest.mark.parametrize(("path", "status"), [("missing", "404 Not Found"), ("error", "500 Internal Server Error")])
def test_a_non_2xx_answer_is_refused_with_its_status(served: Served, path: str, status: str) -> None:
    error = refused(sources(served.port), f"http://images.test:{served.port}/{path}", InvalidImage)
    assert status in error.message


def test_a_body_at_the_limit_is_accepted(served: Served) -> None:
    assert len(fetch(sources(served.port), f"http://images.test:{served.port}/at-limit")) == LIMIT


@pytest.mark.parametrize("path", ["big", "long-declared"])
def test_a_declared_length_over_the_limit_is_refused_before_the_body(served: Served, path: str) -> None:
    error = refused(sources(served.port), f"http://images.test:{served.port}/{path}", PayloadTooLarge)
    assert "Content-Length" in error.message and str(LIMIT) in error.message
    assert "PALIGEMMA_MAX_IMAGE_BYTES" in error.message


@pytest.mark.parametrize("path", ["stream-big", "chunked-big"])
def test_a_body_without_length_stops_being_read_at_the_limit(served: Served, path: str) -> None:
    error = refused(sources(served.port), f"http://images.test:{served.port}/{path}", PayloadTooLarge)
    assert str(LIMIT) in error.message
    # The server could not write its 32 MiB: the client stopped reading and hung up (the server's
    # thread notices on its next write).
    deadline = time.monotonic() + 10
    while not served.unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.unfinished == [f"/{path}"]


def test_a_content_length_under_the_real_size_bounds_what_is_read(served: Served) -> None:
    assert fetch(sources(served.port), f"http://images.test:{served.port}/short-declared") == b"\xff" * 100


def test_a_body_shorter_than_its_content_length_is_refused(served: Served) -> None:
    error = refused(sources(served.port), f"http://images.test:{served.port}/truncated", InvalidImage)
    assert "broke off" in error.message


def test_a_host_slower_than_the_time_limit_gets_a_timeout(served: Served) -> None:
    source = sources(served.port, url_timeout_s=0.5)
    started = time.monotonic()
    error = refused(source, f"http://images.test:{served.port}/trickle", UpstreamTimeout)
    assert time.monotonic() - started < 0.5 + 1.0
    assert error.status_code == 504 and "PALIGEMMA_IMAGE_URL_TIMEOUT_S" in error.message


@pytest.mark.parametrize(("path", "message"), [
    ("gzip", "Content-Encoding 'gzip'"),
    ("empty", "empty body"),
])
def test_unusable_answers_are_refused(served: Served, path: str, message: str) -> None:
    error = refused(sources(served.port), f"http://images.test:{served.port}/{path}", InvalidImage)
    assert message in error.message


def test_a_port_not_listed_is_refused(served: Served) -> None:
    source = ImageSources(max_bytes=LIMIT, url_hosts=["images.test"], resolver=Resolver())
    error = refused(source, f"http://images.test:{served.port}/image", InvalidRequest)
    assert f"on port {served.port}" in error.message and "host:port" in error.message
    assert served.hosts == []


def test_a_suffix_entry_does_not_open_loopback(served: Served) -> None:
    error = refused(sources(served.port), f"http://x.cdn.test:{served.port}/image", InvalidRequest)
    assert "x.cdn.test resolves to a loopback address" in error.message and "listed exactly" in error.message
    assert served.hosts == []


def test_a_name_with_one_private_address_among_public_ones_is_refused() -> None:
    async def mixed(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.1.2.3")]

    source = ImageSources(max_bytes=LIMIT, url_hosts=[".cdn.test"], resolver=mixed)
    error = refused(source, "http://a.cdn.test/image", InvalidRequest)
    assert "resolves to a private address" in error.message
    assert "10.1.2.3" not in error.message  # an internal DNS view is not shown to the client


def test_an_unresolvable_or_unreachable_host_is_a_400() -> None:
    source = ImageSources(max_bytes=LIMIT, url_hosts=["nowhere.invalid", "127.0.0.1:9"])
    async def unknown(host: str, port: int) -> list[IPAddress]:
        raise OSError("Name or service not known")

    failing = ImageSources(max_bytes=LIMIT, url_hosts=["nowhere.invalid"], resolver=unknown)
    assert "could not be resolved" in refused(failing, "http://nowhere.invalid/x", InvalidImage).message
    # Port 9 (discard) on loopback: nothing listens there.
    assert "could not connect" in refused(source, "http://127.0.0.1:9/x", InvalidImage).message


# ------------------------------------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=images.test", "-addext", "subjectAltName=DNS:images.test", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def served_tls(certificate: tuple[Path, Path]) -> Iterator[Served]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    yield from _serve(context)


def test_https_checks_the_certificate_against_the_name_while_connecting_to_the_address(
        served_tls: Served, certificate: tuple[Path, Path]) -> None:
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    source = sources(served_tls.port, ssl_context=trust)
    assert fetch(source, f"https://images.test:{served_tls.port}/image") == IMAGE
    # The same server under another listed name: its certificate does not cover it.
    error = refused(source, f"https://other.test:{served_tls.port}/image", InvalidImage)
    assert "could not connect" in error.message and "certificate" in error.message.lower()
