"""Fetching an allowed image URL: the policy applied to the URL and to every redirect, the body read
under the size limit, everything within one time limit, and a bound on fetches in flight.

* scheme http or https; no user name or password in the URL.
* the host matches an entry of `PALIGEMMA_IMAGE_URL_HOSTS` (`app.image_sources.hosts`).
* the host name is resolved once, here; every address it resolves to must be public unless the host is
  listed exactly. The request goes to a checked address (the Host header and TLS SNI / certificate check
  use the name), never to a second lookup, so a DNS answer that changes between check and connect
  (rebinding) is not followed.
* at most `MAX_REDIRECTS` redirects, followed here; proxies from the environment are ignored.

Refusals are `ServiceError`s with `param="image"`: 400 for a refused or failed URL, 413 past
`PALIGEMMA_MAX_IMAGE_BYTES` (while the answer streams in), 504 (`UpstreamTimeout`) past
`PALIGEMMA_IMAGE_URL_TIMEOUT_S` in all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from app import __version__
from app.errors import InvalidImage, InvalidRequest, UpstreamTimeout, UrlFetchesFull
from app.image_sources.hosts import HOSTS_SETTING, HostEntry, IPAddress, check_address, ip_literal, match_host
from app.image_sources.inline import ACCEPTED_FORMS, too_large

Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

TIMEOUT_SETTING = "PALIGEMMA_IMAGE_URL_TIMEOUT_S"
FETCHES_SETTING = "PALIGEMMA_MAX_URL_FETCHES"
MAX_REDIRECTS = 3
RETRY_AFTER_S = 1

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # normalised: IDNA name or compressed IP
    port: int  # effective
    listed_exactly: bool
    where: str  # how messages name it: "the image URL" or "the image URL (redirected from ...)"


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address of `host` the system resolver gives, in its order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0])) for info in infos))


class UrlFetcher:
    """GETs allowed image URLs (`fetch`), at most `max_in_flight` at a time.

    The bound is its own, apart from the model queue's: a slow host holds a fetch, never a place in the
    model's queue, so it cannot lock out clients who send their image itself."""

    def __init__(self, *, max_bytes: int, hosts: tuple[HostEntry, ...], timeout_s: float,
                 max_in_flight: int, resolver: Resolver = system_resolver,
                 ssl_context: ssl.SSLContext | None = None):
        self.max_bytes = max_bytes
        self.hosts = hosts
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._resolver = resolver
        self._ssl_context = ssl_context

    async def fetch(self, url: str) -> bytes:
        """GET an image URL under the policy: InvalidRequest (400) for a refused URL or redirect,
        InvalidImage (400) for a failed fetch or a non-2xx answer, PayloadTooLarge (413), UrlFetchesFull
        (429) when `max_in_flight` fetches are running, UpstreamTimeout (504) past `timeout_s` in all
        (resolving, redirects and body included)."""
        if not self.hosts:
            raise InvalidRequest(
                f"image URLs are off on this server ({HOSTS_SETTING} is empty); send the image as a file "
                "field `image` (multipart/form-data), or in JSON as base64 or a data URL "
                "(data:image/png;base64,...)",
                param="image")
        if self.in_flight >= self.max_in_flight:
            raise UrlFetchesFull(
                f"{self.in_flight} image URLs are being fetched already, the most this server fetches at "
                f"once ({FETCHES_SETTING}); retry after {RETRY_AFTER_S} s, or send the image itself (a file "
                "field `image`, or base64 in JSON)",
                param="image", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise UpstreamTimeout(
                f"the image URL did not answer in full within {self.timeout_s:g} s ({TIMEOUT_SETTING}); "
                "use a faster host or send the image itself", param="image") from None
        except httpx.HTTPError as exc:  # the connection broke, or the answer is not valid HTTP
            raise InvalidImage(f"the image URL's answer broke off or is malformed ({exc}); check the URL or "
                               "send the image itself") from None
        finally:
            self.in_flight -= 1

    async def _fetch(self, url: str) -> bytes:
        target = self._target(url, None)
        limits = httpx.Limits(max_keepalive_connections=0)  # no connection reused across names (SNI)
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, limits=limits,
                                     verify=self._ssl(), timeout=self.timeout_s) as client:
            for _ in range(MAX_REDIRECTS + 1):
                response = await self._send(client, target)
                try:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        target = self._target(response.headers["location"], target)
                        continue
                    if not response.is_success:
                        raise InvalidImage(f"the image URL answered {response.status_code} "
                                           f"{response.reason_phrase}; check the URL")
                    return await self._read(response)
                finally:
                    await response.aclose()
        raise InvalidImage(f"the image URL redirected more than {MAX_REDIRECTS} times; give the final URL")

    def _target(self, url: str, source: _Target | None) -> _Target:
        where = f"the image URL (redirected from {source.url})" if source else "the image URL"
        try:
            parsed = source.url.join(url) if source else httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise InvalidRequest(f"{where} is not a valid URL ({exc})", param="image") from None
        if parsed.scheme not in ("http", "https"):
            raise InvalidRequest(f"{where} has the scheme {parsed.scheme!r}; only http and https are "
                                 "fetched. " + ACCEPTED_FORMS, param="image")
        if parsed.userinfo:
            raise InvalidRequest(f"{where} holds a user name or password; remove them (credentials are "
                                 "never sent)", param="image")
        raw = parsed.raw_host.decode("ascii")
        address = ip_literal(raw)
        host = address.compressed if address else raw.rstrip(".")
        if not host:
            raise InvalidRequest(f"{where} has no host", param="image")
        default_port = 443 if parsed.scheme == "https" else 80
        port = parsed.port or default_port
        match = match_host(host, port, default_port, self.hosts)
        if match is None:
            on_port = f" on port {port}" if port != default_port else ""
            # The list itself is not quoted: it may name internal hosts.
            raise InvalidRequest(
                f"{where} points to {host}{on_port}, which this server does not fetch from: only hosts "
                f"the operator lists in {HOSTS_SETTING} are (a port other than the scheme's default must be "
                "listed as host:port); send the image itself as base64 or a data URL", param="image")
        return _Target(parsed, host, port, match == "exact", where)

    async def _send(self, client: httpx.AsyncClient, target: _Target) -> httpx.Response:
        literal = ip_literal(target.host)
        if literal is not None:
            addresses: Sequence[IPAddress] = [literal]
        else:
            try:
                addresses = await self._resolver(target.host, target.port)
            except (OSError, UnicodeError) as exc:
                raise InvalidImage(f"the image URL's host {target.host} could not be resolved ({exc})"
                                   ) from None
            if not addresses:
                raise InvalidImage(f"the image URL's host {target.host} has no address")
        for address in addresses:  # all of them, before connecting to any
            check_address(target.host, address, listed_exactly=target.listed_exactly, where=target.where)
        # Connect to a checked address; the name goes in the Host header and (https) the SNI, against which
        # the certificate is checked.
        headers = {"host": target.url.netloc.decode("ascii"), "accept-encoding": "identity",
                   "accept": "image/jpeg, image/png, image/webp, */*;q=0.1",
                   "user-agent": f"paligemma-server/{__version__}"}
        extensions = {"sni_hostname": target.host} if literal is None else {}
        failure: Exception | None = None
        for address in addresses:
            try:
                pinned = target.url.copy_with(host=str(address))
                request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
                return await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.InvalidURL) as exc:  # InvalidURL: an IPv6 scope (`%eth0`)
                failure = exc
        raise InvalidImage(f"could not connect to the image URL's host {target.host} ({failure})")

    async def _read(self, response: httpx.Response) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidImage(f"the image URL answered with Content-Encoding {encoding!r}; serve the image "
                               "file as it is (it is already compressed)")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large(f"the image URL declares {int(declared)} bytes (Content-Length), over",
                             self.max_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:  # reading stops here, whatever Content-Length said
                raise too_large("the image at the URL is over", self.max_bytes)
            chunks.append(chunk)
        if not size:
            raise InvalidImage("the image URL answered with an empty body")
        return b"".join(chunks)

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # made once: loading the CA bundle takes milliseconds
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context
