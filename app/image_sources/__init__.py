"""What a client sends as `image` in a JSON body (or a multipart text field), turned into the image's
bytes. Multipart's file field is read elsewhere (`app.api.bodies`).

Three forms are accepted:

* base64, and base64 data URLs (`inline`);
* an http(s) URL, only for hosts an operator lists in `PALIGEMMA_IMAGE_URL_HOSTS` (`hosts`: the list
  and the address policy; `fetch`: the fetch itself, bounded by `PALIGEMMA_MAX_URL_FETCHES`). Off
  without the list.

Every refusal is a `ServiceError` with `param="image"`.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable

from app.errors import InvalidRequest
from app.image_sources.fetch import Resolver, UrlFetcher, system_resolver
from app.image_sources.hosts import normalise_host_entries, parse_host_entry
from app.image_sources.inline import ACCEPTED_FORMS, SPACES, decode_base64_image

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}:")


class ImageSources:
    """Turns the `image` value of a JSON body into bytes (`load`); holds the limits and the URL policy."""

    def __init__(self, *, max_bytes: int, url_hosts: Iterable[str] = (), url_timeout_s: float = 10.0,
                 max_url_fetches: int = 16, resolver: Resolver = system_resolver,
                 ssl_context: ssl.SSLContext | None = None):
        self.max_bytes = max_bytes
        hosts = tuple(parse_host_entry(entry) for entry in normalise_host_entries(url_hosts))
        self.fetcher = UrlFetcher(max_bytes=max_bytes, hosts=hosts, timeout_s=url_timeout_s,
                                  max_in_flight=max_url_fetches, resolver=resolver, ssl_context=ssl_context)

    @property
    def url_hosts(self) -> tuple[str, ...]:
        return tuple(str(entry) for entry in self.fetcher.hosts)

    @staticmethod
    def is_url(value: str) -> bool:
        """Whether `value` names an image to fetch (http or https) rather than holding one."""
        scheme = _SCHEME.match(value.strip(SPACES))
        return scheme is not None and scheme.group().lower() in ("http:", "https:")

    async def load(self, value: str) -> bytes:
        """The image's bytes from base64, a data URL or an allowed URL (see the module's docstring)."""
        text = value.strip(SPACES)
        scheme = _SCHEME.match(text)  # never base64, which has no `:`
        if scheme is None or scheme.group().lower() == "data:":
            return decode_base64_image(text, self.max_bytes)
        if scheme.group().lower() not in ("http:", "https:"):
            raise InvalidRequest(f"`image` starts with {scheme.group()!r}, which is none of the accepted "
                                 "forms; " + ACCEPTED_FORMS, param="image")
        return await self.fetcher.fetch(text)
