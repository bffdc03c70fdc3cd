"""Strict text fields in multipart bodies, through public APIs only.

Starlette decodes a text field with the charset of the request's Content-Type (UTF-8 when none is given)
and, when the bytes do not decode, silently falls back to Latin-1 (`starlette.formparsers`), so a client
sending another encoding would get a prompt full of mojibake and a 200; python-multipart itself only
splits the body into bytes. `StrictFormRoute`, a FastAPI route class (FastAPI's documented way to
customise the request a route sees), reads the same body through python-multipart's public
`MultipartParser` as Starlette consumes it, and refuses the first text part whose bytes do not decode
with the charset Starlette will use: a 400 naming the field, before the endpoint runs. So a text value
that reaches a route is exactly the text the client sent; a U+FFFD in it was sent as such.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.types import Message, Receive

from app.errors import InvalidRequest

_NAME_CHARS = 100  # a field name is quoted in the message, bounded


class _TextPartCheck:
    """Feeds the body to a second multipart parser that only decodes text parts, incrementally."""

    def __init__(self, boundary: bytes, charset: str):
        self.charset = charset
        self.error: InvalidRequest | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._field = ""
        self._decoder: codecs.IncrementalDecoder | None = None
        self._parser: MultipartParser | None = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        })

    @classmethod
    def for_request(cls, request: Request) -> _TextPartCheck | None:
        """A check for a multipart request, with the charset Starlette decodes its fields with."""
        content_type, params = parse_options_header(request.headers.get("content-type"))
        boundary = params.get(b"boundary")
        if content_type != b"multipart/form-data" or not boundary:
            return None  # not multipart, or Starlette refuses it itself
        try:
            charset = codecs.lookup(params.get(b"charset", b"utf-8").decode("latin-1")).name
        except LookupError:
            charset = "latin-1"  # Starlette's choice for an unknown charset: every byte decodes
        return cls(boundary, charset)

    def receive(self, receive: Receive) -> Receive:
        async def checked() -> Message:
            message = await receive()
            if message["type"] == "http.request" and self._parser is not None:
                try:
                    self._parser.write(message.get("body", b""))
                except FormParserError:
                    self._parser = None  # a malformed body: Starlette's own parser refuses it
            if self.error is not None:
                raise self.error
            return message

        return checked

    def _on_part_begin(self) -> None:
        self._disposition = b""
        self._decoder = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"filename" in options:
            return  # a file: its bytes are not text
        self._field = options.get(b"name", b"").decode(self.charset, "replace")[:_NAME_CHARS]
        self._decoder = codecs.getincrementaldecoder(self.charset)()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._decoder is not None:
            self._decode(data[start:end], final=False)

    def _on_part_end(self) -> None:
        if self._decoder is not None:
            self._decode(b"", final=True)

    def _decode(self, data: bytes, final: bool) -> None:
        assert self._decoder is not None
        try:
            self._decoder.decode(data, final)
        except UnicodeDecodeError:
            if self.error is None:
                declared = f"{self.charset} (the charset the request declares)"
                name = "UTF-8" if self.charset == "utf-8" else declared
                self.error = InvalidRequest(
                    f"`{self._field}` must be {name} text; its bytes are not. Send text fields encoded as "
                    "UTF-8 (most clients do when given text, not bytes).",
                    param=self._field,
                )
            self._decoder = None


class StrictFormRoute(APIRoute):
    """A route whose multipart text fields must decode; every router with form fields uses it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            check = _TextPartCheck.for_request(request)
            if check is None:
                return await handler(request)
            try:
                return await handler(Request(request.scope, check.receive(request.receive)))
            except Exception:
                # FastAPI reports any failure while reading the form as a bare 400; ours names the field.
                if check.error is not None:
                    raise check.error from None
                raise

        return strict_handler

