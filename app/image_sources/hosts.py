"""The operator's list of image URL hosts (`PALIGEMMA_IMAGE_URL_HOSTS`) and the addresses a fetch may
connect to: pure functions, no I/O.

* An entry is `images.example.com` (that host), `.example.com` (its subdomains, not `example.com`
  itself), or an IP address. An entry without a port allows only the scheme's default port (80 / 443);
  `host:8080` allows that port (and only that one) on that host.
* Every address a host name resolves to must be public (`address_category`) unless the host is listed
  exactly (not through a `.domain` entry).

`app.settings` reads the list through `normalise_host_entries`; `app.image_sources.fetch` applies it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import httpx

from app.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HOSTS_SETTING = "PALIGEMMA_IMAGE_URL_HOSTS"

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_ENTRY = re.compile(r"(\.?)(\[[^\]]*\]|[^:\[\]]+)(?::([0-9]{1,5}))?")


# The allow-list's entries ----------------------------------------------------------------------------
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
    address = ip_literal(host.strip("[]"))
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


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# The address policy ---------------------------------------------------------------------------------
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
