"""Streamed responses. Server-sent events as OpenAI sends them: one `data: {json}` event
per chunk, then `data: [DONE]`; comment pings (`: ping`) keep the connection alive while
a long prompt is processed. Newline-delimited JSON as Ollama sends it. A failure after
the stream has started is reported in the stream, in the API's own error shape."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable, TypeVar

import anyio
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from elmd.engine.engine import MemoryBudgetError
from elmd.server.admission import Lease
from elmd.server.errors import APIError, over_memory_budget, timed_out
from elmd.settings import SHUTDOWN_GRACE_SECONDS

log = logging.getLogger("elmd.server")

T = TypeVar("T")
_END = object()
SEP = "\n"  # as OpenAI frames events (sse-starlette defaults to CRLF)


SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
# One server-sent event, as OpenAPI before 3.2 describes a text/event-stream: its JSON in `data`.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}


def streamed(model: type[BaseModel], event: type[BaseModel], media_type: str = SSE) -> dict[int, dict]:
    """The documented 200 of a route that answers `model` as JSON, or with `stream: true`
    `event` objects as server-sent events (or as Ollama's newline-delimited JSON)."""
    return {200: {"model": model, "description": f"`{model.__name__}`; with `stream: true`, `{event.__name__}` "
                                                 f"objects as {media_type}.",
                  "content": {media_type: {"schema": SSE_EVENT if media_type == SSE else {"type": "string"}}}}}


def sse_response(events: AsyncIterator[BaseModel], lease: Lease, *,
                 error: Callable[[APIError], BaseModel | dict] | None = None, named: bool = False,
                 done: bool = True) -> EventSourceResponse:
    """Stream `events` to the client; the lease is released when the stream ends, fails
    or the client goes away (the background task covers a client gone before the start).
    Chat and completions send OpenAI's error object on failure and end with `[DONE]`; the
    Responses API names each event by its `type`, reports failures as its own error event
    (`error`) and sends no `[DONE]` (`named=True, done=False`). On SIGTERM the stream goes on
    for the daemon's shutdown grace period (sse-starlette would otherwise cut every stream at
    once), so an answer in flight can finish."""
    lease.hand_to_stream()
    return EventSourceResponse(
        _frames(guarded(events, lease, error or APIError.body), named, done),
        ping=lease.settings.sse_ping_seconds,
        sep=SEP,
        background=BackgroundTask(lease.release),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        shutdown_event=anyio.Event(),
        shutdown_grace_period=SHUTDOWN_GRACE_SECONDS - 0.5,  # ends before uvicorn cancels the connection
    )


def ndjson_response(events: AsyncIterator[BaseModel], lease: Lease | None,
                    error: Callable[[APIError], BaseModel | dict]) -> StreamingResponse:
    """Stream `events` as newline-delimited JSON (Ollama's streaming), one object per line;
    the lease (if the stream holds one) is released as with `sse_response`."""
    if lease is not None:
        lease.hand_to_stream()

    async def lines() -> AsyncIterator[str]:
        checked = guarded(events, lease, error)
        try:
            async for event in checked:
                yield _json(event) + "\n"
        finally:
            await checked.aclose()  # at once, when the client goes away, not when collected

    return StreamingResponse(lines(), media_type=NDJSON,
                             background=BackgroundTask(lease.release) if lease else None)


async def guarded(events: AsyncIterator[BaseModel], lease: Lease | None,
                  error: Callable[[APIError], BaseModel | dict]) -> AsyncIterator[BaseModel | dict]:
    """`events`, then `error(exc)` if they fail (a timeout, an APIError, anything else as
    a 500 whose detail goes to the log only); the lease is released either way."""
    # No per-event wait_for: a client that goes away cancels this generator's task, and
    # the cancellation must unwind the event generator in place (the deadline lives in `merge`).
    try:
        async for event in events:
            yield event
    except asyncio.TimeoutError:
        yield error(timed_out(1))
    except APIError as exc:
        yield error(exc)
    except MemoryBudgetError as exc:
        yield error(over_memory_budget(exc))
    except Exception:
        log.exception("stream failed")
        yield error(APIError(500, "The server had an error while processing your request.",
                             type="server_error", code="internal_error"))
    finally:
        await events.aclose()
        if lease is not None:
            lease.release()


async def _frames(events: AsyncIterator[BaseModel | dict], named: bool, done: bool) -> AsyncIterator[ServerSentEvent]:
    try:
        async for event in events:
            name = (event.get("type") if isinstance(event, dict) else getattr(event, "type", None)) if named else None
            yield ServerSentEvent(data=_json(event), event=name, sep=SEP)
    finally:
        await events.aclose()  # at once, when the client goes away, not when collected
    if done:
        yield ServerSentEvent(data="[DONE]", sep=SEP)


def _json(event: BaseModel | dict) -> str:
    return json.dumps(event) if isinstance(event, dict) else event.model_dump_json()


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
