"""Token streaming as server-sent events: text deltas as the engine computes them, then the result.

The engine hands over token ids, step by step; `IncrementalText` turns them into text deltas without ever
emitting half a character (a byte-level token can end inside a multi-byte UTF-8 sequence, which decodes
to U+FFFD until the rest arrives). `stream_job` starts the request and waits for its first token before
the response begins, so refusals (429, 400, 413...) still get their HTTP status; later failures become
an `error` event carrying the usual envelope. A client that leaves stops its request, and every task the
stream started is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from fastapi.responses import StreamingResponse

from app.errors import ServiceError

if TYPE_CHECKING:  # the model layer (torch) is not needed to write events
    from app.model.inputs import PromptEncoder

_INCOMPLETE = "\ufffd"
EVENT_STREAM = "text/event-stream"


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class IncrementalText:
    """Token ids in, text deltas out; decodes the whole output each time (outputs are short)."""

    def __init__(self, encoder: PromptEncoder):
        self.encoder = encoder
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        text = self.encoder.decode(self.tokens)
        if text.endswith(_INCOMPLETE) or not text.startswith(self.sent):
            return ""  # wait for the rest of the character (or of a retokenised span)
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.encoder.decode(self.tokens)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


OnTokens = Callable[[list[int]], None]


class EventFormat(Protocol):
    """How a stream's events are written: this server's task events, or OpenAI's chunks."""

    def delta(self, text: str) -> bytes: ...
    async def result(self, result: Any) -> bytes: ...
    def error(self, error: ServiceError) -> bytes: ...


def stream_job(run: Callable[[OnTokens], Awaitable[Any]], encoder: PromptEncoder,
               form: EventFormat) -> Awaitable[StreamingResponse]:
    """Start `run(on_tokens)` now; the awaitable answers, once its first tokens (or its end) arrive, with
    an event stream of text deltas and, at the end, `form.result` of what `run` returned (or
    `form.error`). Started here, in the handler's own step of the event loop as a plain request's run is
    (`app.api.tasks.until_disconnect`), so that both forms reach the engine in the order they came."""
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    work = asyncio.ensure_future(run(queue.put_nowait))
    return _respond(work, queue, encoder, form)


async def _respond(work: asyncio.Future[Any], queue: asyncio.Queue[list[int]], encoder: PromptEncoder,
                   form: EventFormat) -> StreamingResponse:
    first = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({work, first}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _cancel(work, first)
        raise
    if work.done() and not first.done():
        await _cancel(first)
        work.result()  # a refusal or failure before any token: raised here, answered with its status
    pending = [first.result()] if first.done() else []
    text = IncrementalText(encoder)

    async def events() -> AsyncIterator[bytes]:
        getter: asyncio.Future[list[int]] | None = None
        try:
            for tokens in pending:
                if delta := text.push(tokens):
                    yield form.delta(delta)
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    break
                if delta := text.push(getter.result()):
                    yield form.delta(delta)
            while not queue.empty():
                text.push(queue.get_nowait())
            try:
                result = work.result()
            except ServiceError as exc:
                yield form.error(exc)
                return
            if delta := text.flush():
                yield form.delta(delta)
            yield await form.result(result)
        finally:
            # The client left mid-stream (or the stream ended): stop the request, its row is freed at
            # the next step, and leave no task pending.
            await _cancel(work, *([getter] if getter is not None else []))

    return StreamingResponse(events(), media_type=EVENT_STREAM,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel `tasks` and wait until they have ended. Shielded, so that the caller's own cancellation
    (the server cancelling a stream whose client left) cannot leave them pending."""
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
