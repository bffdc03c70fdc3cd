"""Streamed answers: a task's server-sent events read as text deltas, then the typed result.

With `stream=true` the server answers `text/event-stream`: `delta` events (`{"text": ...}`, the output as
it is generated, `<loc>`/`<seg>` tokens included), then one `result` event holding exactly the JSON the
endpoint answers without streaming, or an `error` event with the error envelope when the request fails
after the stream began. `Stream` and `AsyncStream` read those events; what they share is here too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from paligemma_client._core import Request
from paligemma_client.errors import APIConnectionError, PaliGemmaError, StreamError, error_from_event

R = TypeVar("R", bound=BaseModel)
Self = TypeVar("Self")


@dataclass(frozen=True)
class Event:
    event: str
    data: str


class EventDecoder:
    """Lines of an event stream in, events out, as the HTML standard reads them: `event:` and `data:`
    fields up to a blank line, comments (`:`) and unknown fields skipped, several `data:` lines joined."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """Take one line (without its line ending); return the event a blank line completes."""
        if not line:
            event = Event(self._event or "message", "\n".join(self._data)) if self._data else None
            self._event, self._data = "", []
            return event
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


class _Events(Generic[R]):
    """What both streams keep: the text so far, the result once it came, and how to read one line."""

    def __init__(self, request: Request[R], response: httpx.Response, base_url: str):
        self._request = request
        self._response = response
        self._where = f"{request.method} {base_url}{request.path}"
        self._decoder = EventDecoder()
        self._result: R | None = None
        self._error: PaliGemmaError | None = None
        self.text = ""
        """The text received so far (all of it, once the stream has ended)."""
        self.request_id: str | None = response.headers.get("x-request-id")
        """The server's id for this request (quote it when reporting a problem)."""

    @property
    def result(self) -> R:
        """The typed result, once the stream has been read to its end (iterate over it, or get_result())."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("the stream has not been read to its end yet: iterate over it, or call "
                               "get_result()")
        return self._result

    @property
    def finished(self) -> bool:
        """Whether the stream has ended: with its result, or with an error."""
        return self._result is not None or self._error is not None

    def _take(self, line: str) -> str:
        """One line of the stream: the text delta it completes ("" for none). Keeps the result; raises
        the server's error event as a `StreamError`."""
        event = self._decoder.feed(line)
        if event is None or event.event not in ("delta", "result", "error"):
            return ""  # comments, keep-alives and events a newer server may add
        try:
            data = json.loads(event.data)
            if event.event == "delta":
                delta = str(data["text"])
                self.text += delta
                return delta
            if event.event == "result":
                self._result = self._request.result.model_validate(data)
                return ""
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise self._fail(StreamError(self._response.status_code, "invalid_event",
                                         f"unreadable `{event.event}` event: {exc}", None,
                                         self.request_id)) from exc
        # The one event left: `error`, the server's error envelope.
        raise self._fail(error_from_event(data, self._response.status_code, self.request_id))

    def _fail(self, error: PaliGemmaError) -> PaliGemmaError:
        self._error = error
        return error

    def _ended(self) -> None:
        """The server closed the stream: that is only right after the result."""
        if self._result is None:
            raise self._fail(APIConnectionError(f"{self._where}: the stream ended before its result"))

    def _broken(self, exc: httpx.TransportError) -> PaliGemmaError:
        return self._fail(APIConnectionError(f"{self._where}: the stream broke off: {exc!r}"))


class Stream(_Events[R]):
    """A task's answer as it is generated. Iterate over it for the text deltas; then `result` holds the
    typed result (the same as the method without `_stream` returns). Closing it early (leaving the loop
    and the `with` block) hangs up, and the server stops generating.

        with client.caption_stream("photo.jpg") as stream:
            for delta in stream:
                print(delta, end="", flush=True)
        print(stream.result.text)
    """

    def __iter__(self) -> Iterator[str]:
        return self.text_deltas()

    def text_deltas(self) -> Iterator[str]:
        """The text as it is generated, piece by piece (nothing more once the stream has ended)."""
        if self.finished:
            return
        try:
            for line in self._response.iter_lines():
                if delta := self._take(line):
                    yield delta
                if self.finished:
                    return
            self._ended()
        except httpx.TransportError as exc:
            raise self._broken(exc) from exc
        finally:
            self.close()

    def get_result(self) -> R:
        """Read whatever is left of the stream and return the typed result."""
        for _ in self.text_deltas():
            pass
        return self.result

    def close(self) -> None:
        self._response.close()

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


class AsyncStream(_Events[R]):
    """`Stream` for asyncio: `async for delta in stream`, then `stream.result`; `await stream.get_result()`.

        async with await client.caption_stream("photo.jpg") as stream:
            async for delta in stream:
                print(delta, end="", flush=True)
        print(stream.result.text)
    """

    def __aiter__(self) -> AsyncIterator[str]:
        return self.text_deltas()

    async def text_deltas(self) -> AsyncIterator[str]:
        """The text as it is generated, piece by piece (nothing more once the stream has ended)."""
        if self.finished:
            return
        try:
            async for line in self._response.aiter_lines():
                if delta := self._take(line):
                    yield delta
                if self.finished:
                    return
            self._ended()
        except httpx.TransportError as exc:
            raise self._broken(exc) from exc
        finally:
            await self.close()

    async def get_result(self) -> R:
        """Read whatever is left of the stream and return the typed result."""
        async for _ in self.text_deltas():
            pass
        return self.result

    async def close(self) -> None:
        await self._response.aclose()

    async def __aenter__(self: Self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()
