"""Server-sent events as OpenAI sends them: one `data: {json}` event per chunk, then
`data: [DONE]`; comment pings (`: ping`) keep the connection alive while a long prompt
is processed. A failure after the stream has started is reported as an error event."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, TypeVar

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from elmd.server.errors import APIError, timed_out
from elmd.server.manager import Lease

log = logging.getLogger("elmd.server")

T = TypeVar("T")
_END = object()
SEP = "\n"  # as OpenAI frames events (sse-starlette defaults to CRLF)


def sse_response(events: AsyncIterator[BaseModel], lease: Lease, ping_seconds: float) -> EventSourceResponse:
    """Stream `events` to the client; the lease is released when the stream ends, fails
    or the client goes away (the background task covers a client gone before the start)."""
    return EventSourceResponse(
        _frames(events, lease),
        ping=ping_seconds,
        sep=SEP,
        background=BackgroundTask(lease.release),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _frames(events: AsyncIterator[BaseModel], lease: Lease) -> AsyncIterator[ServerSentEvent]:
    # No per-event wait_for: a client that goes away cancels this generator's task, and
    # the cancellation must unwind the event generator in place (the deadline lives in `merge`).
    try:
        async for event in events:
            yield ServerSentEvent(data=event.model_dump_json(), sep=SEP)
    except asyncio.TimeoutError:
        yield _error_event(timed_out(1))
    except APIError as exc:
        yield _error_event(exc)
    except Exception:
        log.exception("stream failed")
        yield _error_event(APIError(500, "The server had an error while processing your request.",
                                    type="server_error", code="internal_error"))
    finally:
        await events.aclose()
        lease.release()
    yield ServerSentEvent(data="[DONE]", sep=SEP)


def _error_event(exc: APIError) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(exc.body()), sep=SEP)


async def merge(streams: list[AsyncIterator[T]], deadline: float) -> AsyncIterator[tuple[int, T]]:
    """Items from several async iterators as they arrive, tagged with the iterator's index;
    asyncio.TimeoutError once `deadline` (time.monotonic()) passes. Closing the merged
    stream cancels every source (and so its generation)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item, None))
            queue.put_nowait((index, _END, None))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait((index, _END, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.get_running_loop().create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            remaining = max(0.0, deadline - time.monotonic())
            index, item, error = await asyncio.wait_for(queue.get(), timeout=remaining)
            if error is not None:
                raise error
            if item is _END:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
