"""What a client sends as `image` in a JSON body, turned into the image's bytes.

Three forms are accepted (multipart's file field is read elsewhere):

* base64, standard alphabet (`+/`); padding optional, ASCII whitespace and newlines ignored.
* a data URL whose payload is base64: `data:image/png;base64,...` (any `image/*` type, or
  `application/octet-stream`). The bytes are recognised later by their magic, not by this media type.
* an http(s) URL, only for hosts an operator lists in `PALIGEMMA_IMAGE_URL_HOSTS`; off without it.

Every refusal is a `ServiceError` with `param="image"`: 400 for a value that is malformed or refused,
413 over `PALIGEMMA_MAX_IMAGE_BYTES` (checked on the encoded length before decoding, and while a URL's
answer streams in), 504 (`UpstreamTimeout`) when a URL does not answer in full within
`PALIGEMMA_IMAGE_URL_TIMEOUT_S`.

URL policy (`ImageSources.fetch`), applied to the URL and again to every redirect target:

* scheme http or https; no user name or password in the URL.
* the host matches an entry of the list: `images.example.com` (that host), `.example.com` (its
  subdomains, not `example.com` itself), or an IP address. An entry without a port allows only the
  scheme's default port (80 / 443); `host:8080` allows that port (and only that one) on that host.
* the host name is resolved once, here; every address it resolves to must be public
  (`address_category`) unless the host is listed exactly (not through a `.domain` entry). The request
  goes to a checked address (the Host header and TLS SNI / certificate check use the name), never to a
  second lookup, so a DNS answer that changes between check and connect (rebinding) is not followed.
* at most `MAX_REDIRECTS` redirects, followed here; proxies from the environment are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import httpx

from app import __version__
from app.errors import InvalidImage, InvalidRequest, PayloadTooLarge, UpstreamTimeout

if TYPE_CHECKING:
    from app.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

MAX_BYTES_SETTING = "PALIGEMMA_MAX_IMAGE_BYTES"
HOSTS_SETTING = "PALIGEMMA_IMAGE_URL_HOSTS"
TIMEOUT_SETTING = "PALIGEMMA_IMAGE_URL_TIMEOUT_S"
MAX_REDIRECTS = 3

ACCEPTED_FORMS = ("send the image as a file field `image` (multipart/form-data), or in JSON as base64, as a "
                  "data URL (data:image/png;base64,...) or as an http(s) URL of a host the server allows")

_SPACES = " \t\n\r\f\v"  # ASCII whitespace; str.strip() would also drop \x1c-\x1f and Unicode spaces
_WHITESPACE = _SPACES.encode()
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_STRAY = re.compile(r"[^A-Za-z0-9+/= \t\n\r\f\v]")
_INNER_PADDING = re.compile(r"=+[ \t\n\r\f\v]*[^= \t\n\r\f\v]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}:")
_DATA_URL = re.compile(r"data:([^,]{0,256}),", re.IGNORECASE)
_REDIRECTS = (301, 302, 303, 307, 308)
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_ENTRY = re.compile(r"(\.?)(\[[^\]]*\]|[^:\[\]]+)(?::([0-9]{1,5}))?")


# --------------------------------------------------------------------------------- base64, data URLs
def decode_base64_image(value: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or a base64 data URL, at most `max_bytes` of them.

    Raises PayloadTooLarge (413) when the decoded size would be over `max_bytes` (known from the
    length, before decoding), InvalidImage (400) when empty, InvalidRequest (400) when malformed."""
    text = value.strip(_SPACES)
    if text[:5].lower() == "data:":
        text = _data_url_payload(text)
    # Base64 is 4 characters for 3 bytes; the slack lets MIME-style line breaks through.
    if len(text) > _encoded_length(max_bytes) * 2 + 1024:
        raise _too_large(f"the base64 in `image` ({len(text)} characters) holds more than", max_bytes)
    try:
        compact = text.encode("ascii").translate(None, _WHITESPACE)
    except UnicodeEncodeError as exc:
        raise _not_base64(f"it holds the non-ASCII character {text[exc.start]!r}") from None
    body = compact.rstrip(b"=")
    padding = len(compact) - len(body)
    if not body:
        raise InvalidImage("the image is empty (no base64 data); " + ACCEPTED_FORMS)
    size = len(body) * 3 // 4
    if size > max_bytes:
        raise _too_large(f"the base64 in `image` decodes to {size} bytes, over", max_bytes)
    if body.translate(None, _ALPHABET):  # what is left is not base64 (a fast C pass; the search is not)
        raise _not_base64(_first_stray_character(text))
    if len(body) % 4 == 1 or (padding and padding != -len(body) % 4):
        raise _not_base64(f"its length or padding is wrong ({len(body)} characters, then {padding} `=`)")
    try:
        data = base64.b64decode(body + b"=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:  # not expected after the checks above; refused all the same
        raise _not_base64(str(exc)) from None
    if len(data) > max_bytes:  # cannot happen given the length check; kept as the contract's guard
        raise _too_large(f"the image is {len(data)} bytes, over", max_bytes)
    return data


def _first_stray_character(text: str) -> str:
    stray = _STRAY.search(text)
    if stray is None:  # the alphabet is fine, so an `=` comes before more data
        stray = _INNER_PADDING.search(text)
        assert stray is not None
        return f"padding (`=`) comes before more data at character {stray.start()}"
    if stray.group() in "-_":
        return "it uses the URL-safe alphabet (- and _); use the standard one (+ and /)"
    return f"it holds {stray.group()!r} at character {stray.start()}"


def _data_url_payload(text: str) -> str:
    header = _DATA_URL.match(text)
    if header is None:
        raise InvalidRequest("`image` starts with `data:` but has no `,` before its data; write "
                             "data:image/png;base64,<base64>. " + ACCEPTED_FORMS, param="image")
    media_type, *parameters = (part.strip().lower() for part in header.group(1).split(";"))
    if not parameters or parameters[-1] != "base64":
        raise InvalidRequest("`image` is a data URL without `;base64`; only base64 data URLs are accepted "
                             "(data:image/png;base64,...)", param="image")
    if not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise InvalidRequest(f"`image` is a data URL of type {media_type or '(none)'!r}; use an image type "
                             "(data:image/png;base64,...) or application/octet-stream", param="image")
    return text[header.end():]


def _encoded_length(size: int) -> int:
    return 4 * -(-size // 3)


def _not_base64(reason: str) -> InvalidRequest:
    return InvalidRequest(f"`image` is not valid base64: {reason}. " + ACCEPTED_FORMS, param="image")


def _too_large(what: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} the limit of {limit} bytes ({MAX_BYTES_SETTING}); send a smaller or more "
                           "compressed image", param="image")


# ----------------------------------------------------------------------------- the allow-list's entries
@dataclass(frozen=True)
class HostEntry:
    host: str  # lower-case ASCII (IDNA) name without the trailing dot, or an IP address's compressed form
    suffix: bool  # `.example.com`: subdomains of `host`
    port: int | None  # None: the scheme's default port only

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return ("." if self.suffix else "") + host + (f":{self.port}" if self.port is not None else "")


def parse_host_entry(entry: str) -> HostEntry:
    """One entry of PALIGEMMA_IMAGE_URL_HOSTS; ValueError saying what is wrong and what is accepted."""
    text = entry.strip()
    hint = ("write a host name (images.example.com), .domain for its subdomains (.example.com), or an IP "
            "address, each optionally with :port")
    if text.startswith("*."):
        raise ValueError(f"{text!r}: write {text[1:]} (a leading dot) to allow the subdomains of {text[2:]}")
    match = _ENTRY.fullmatch(text)
    if match is None or any(char in text for char in "/@?#*"):
        raise ValueError(f"{text!r} is not a host entry; {hint}")
    dot, host, port_text = match.groups()
    port = int(port_text) if port_text is not None else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not in 1-65535")
    address = _ip_literal(host.strip("[]"))
    if address is not None:
        if dot:
            raise ValueError(f"{text!r}: a leading dot needs a domain name, not an IP address; {hint}")
        return HostEntry(address.compressed, False, port)
    if host.startswith("["):
        raise ValueError(f"{text!r}: {host} is not an IPv6 address")
    name = _normalise_name(host)
    labels = name.split(".") if name else []
    if not labels or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{text!r}: {host!r} is not a valid host name; {hint}")
    if dot and len(labels) < 2:
        raise ValueError(f"{text!r} would allow every host under a top-level domain; list a domain "
                         "(.example.com) or hosts")
    return HostEntry(name, bool(dot), port)


def normalise_host_entries(entries: Iterable[str]) -> tuple[str, ...]:
    """The entries in their canonical form (`str(HostEntry)`), blanks and duplicates dropped."""
    parsed = (str(parse_host_entry(entry)) for entry in entries if entry.strip())
    return tuple(dict.fromkeys(parsed))


def match_host(host: str, port: int, default_port: int, entries: Iterable[HostEntry]) -> Literal[
        "exact", "suffix"] | None:
    """How a URL's (normalised) host and effective port are allowed: by an exact entry, only by a
    `.domain` entry, or not at all."""
    found: Literal["exact", "suffix"] | None = None
    for entry in entries:
        if port != (entry.port if entry.port is not None else default_port):
            continue
        if entry.host == host and not entry.suffix:
            return "exact"
        if entry.suffix and host.endswith("." + entry.host):
            found = "suffix"
    return found


def _normalise_name(host: str) -> str:
    try:
        return httpx.URL(f"http://{host}/").raw_host.decode("ascii").rstrip(".")
    except (httpx.InvalidURL, UnicodeError):
        return ""


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------- address policy
_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
# Explicit tables rather than `ipaddress`'s is_private / is_global, whose answers change between Python
# versions. First match wins; IPv6 forms that carry an IPv4 address are judged by that address.
_CATEGORIES: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (_V4("0.0.0.0/8"), "unspecified"), (_V4("10.0.0.0/8"), "private"), (_V4("100.64.0.0/10"), "private"),
    (_V4("127.0.0.0/8"), "loopback"), (_V4("169.254.0.0/16"), "link-local"),
    (_V4("172.16.0.0/12"), "private"), (_V4("192.0.0.0/24"), "reserved"), (_V4("192.0.2.0/24"), "reserved"),
    (_V4("192.88.99.0/24"), "reserved"), (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "reserved"), (_V4("198.51.100.0/24"), "reserved"),
    (_V4("203.0.113.0/24"), "reserved"), (_V4("224.0.0.0/4"), "multicast"), (_V4("240.0.0.0/4"), "reserved"),
    (_V6("::/128"), "unspecified"), (_V6("::1/128"), "loopback"), (_V6("64:ff9b:1::/48"), "private"),
    (_V6("100::/64"), "reserved"), (_V6("2001::/23"), "reserved"), (_V6("2001:db8::/32"), "reserved"),
    (_V6("fc00::/7"), "private"), (_V6("fe80::/10"), "link-local"), (_V6("fec0::/10"), "private"),
    (_V6("ff00::/8"), "multicast"),
)
_NAT64 = _V6("64:ff9b::/96")
_GLOBAL_UNICAST = _V6("2000::/3")


def address_category(address: IPAddress) -> str | None:
    """Why a fetch must not connect to `address` unless its host is listed exactly ("loopback",
    "private", "link-local", "multicast", "reserved", "unspecified"), or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return address_category(embedded)
        address = ipaddress.IPv6Address(address.packed)  # drops a scope id (`%eth0`)
    for network, category in _CATEGORIES:
        if address.version == network.version and address in network:
            return category
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST:
        return "reserved"
    return None


def check_address(host: str, address: IPAddress, *, listed_exactly: bool,
                  where: str = "the image URL") -> None:
    """InvalidRequest unless `address` may be fetched for `host`: public, or the host listed exactly."""
    category = address_category(address)
    if category is not None and not listed_exactly:
        # The address itself is not quoted: it may come from an internal DNS view.
        raise InvalidRequest(
            f"{where}'s host {host} resolves to a {category} address; such addresses are fetched only for "
            f"hosts listed exactly (not through a .domain entry) in {HOSTS_SETTING}", param="image")


# ------------------------------------------------------------------------------------------ fetching
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


class ImageSources:
    """Turns the `image` value of a JSON body into bytes (`load`); holds the limits and the URL policy."""

    def __init__(self, *, max_bytes: int, url_hosts: Iterable[str] = (), url_timeout_s: float = 10.0,
                 resolver: Resolver = system_resolver, ssl_context: ssl.SSLContext | None = None):
        self.max_bytes = max_bytes
        self.url_hosts = tuple(parse_host_entry(entry) for entry in normalise_host_entries(url_hosts))
        self.url_timeout_s = url_timeout_s
        self._resolver = resolver
        self._ssl_context = ssl_context

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> ImageSources:
        options: dict[str, object] = {"max_bytes": settings.max_image_bytes,
                                      "url_hosts": settings.image_url_hosts,
                                      "url_timeout_s": settings.image_url_timeout_s, **overrides}
        return cls(**options)  # type: ignore[arg-type]

    async def load(self, value: str) -> bytes:
        """The image's bytes from base64, a data URL or an allowed URL (see the module's docstring)."""
        text = value.strip(_SPACES)
        scheme = _SCHEME.match(text)  # never base64, which has no `:`
        if scheme is None or scheme.group().lower() == "data:":
            return decode_base64_image(text, self.max_bytes)
        if scheme.group().lower() not in ("http:", "https:"):
            raise InvalidRequest(f"`image` starts with {scheme.group()!r}, which is none of the accepted "
                                 "forms; " + ACCEPTED_FORMS, param="image")
        return await self.fetch(text)

    async def fetch(self, url: str) -> bytes:
        """GET an image URL under the policy: InvalidRequest (400) for a refused URL or redirect,
        InvalidImage (400) for a failed fetch or a non-2xx answer, PayloadTooLarge (413),
        UpstreamTimeout (504) past `url_timeout_s` in all (resolving, redirects and body included)."""
        if not self.url_hosts:
            raise InvalidRequest(
                f"image URLs are off on this server ({HOSTS_SETTING} is empty); send the image as a file "
                "field `image` (multipart/form-data), or in JSON as base64 or a data URL "
                "(data:image/png;base64,...)",
                param="image")
        try:
            return await asyncio.wait_for(self._fetch(url), self.url_timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise UpstreamTimeout(
                f"the image URL did not answer in full within {self.url_timeout_s:g} s ({TIMEOUT_SETTING}); "
                "use a faster host or send the image itself", param="image") from None
        except httpx.HTTPError as exc:  # the connection broke, or the answer is not valid HTTP
            raise InvalidImage(f"the image URL's answer broke off or is malformed ({exc}); check the URL or "
                               "send the image itself") from None

    async def _fetch(self, url: str) -> bytes:
        target = self._target(url, None)
        limits = httpx.Limits(max_keepalive_connections=0)  # no connection reused across names (SNI)
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, limits=limits,
                                     verify=self._ssl(), timeout=self.url_timeout_s) as client:
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
        address = _ip_literal(raw)
        host = address.compressed if address else raw.rstrip(".")
        if not host:
            raise InvalidRequest(f"{where} has no host", param="image")
        default_port = 443 if parsed.scheme == "https" else 80
        port = parsed.port or default_port
        match = match_host(host, port, default_port, self.url_hosts)
        if match is None:
            on_port = f" on port {port}" if port != default_port else ""
            # The list itself is not quoted: it may name internal hosts.
            raise InvalidRequest(
                f"{where} points to {host}{on_port}, which this server does not fetch from: only hosts "
                f"the operator lists in {HOSTS_SETTING} are (a port other than the scheme's default must be "
                "listed as host:port); send the image itself as base64 or a data URL", param="image")
        return _Target(parsed, host, port, match == "exact", where)

    async def _send(self, client: httpx.AsyncClient, target: _Target) -> httpx.Response:
        literal = _ip_literal(target.host)
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
            raise _too_large(f"the image URL declares {int(declared)} bytes (Content-Length), over",
                             self.max_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:  # reading stops here, whatever Content-Length said
                raise _too_large("the image at the URL is over", self.max_bytes)
            chunks.append(chunk)
        if not size:
            raise InvalidImage("the image URL answered with an empty body")
        return b"".join(chunks)

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # made once: loading the CA bundle takes milliseconds
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context
