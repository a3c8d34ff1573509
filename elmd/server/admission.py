"""Back-pressure: who may generate now, who waits, and until when.

At most `max_concurrent_requests` run and `max_queued_requests` wait; beyond that a request
gets 429 with Retry-After, and one that waits past its deadline (`request_timeout` after it
arrived) gets 503 with Retry-After. A `Lease` is one request's hold on a generation slot and
on its loaded model.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable

from elmd.server.errors import too_many_requests, unavailable
from elmd.settings import Settings

if TYPE_CHECKING:
    from elmd.engine.engine import Engine


class Lease:
    """One request's hold on a loaded model and on a generation slot; `release()` once done."""

    def __init__(self, engine: "Engine", settings: Settings, deadline: float, on_release: Callable[[], None]):
        self.engine = engine
        self.deadline = deadline
        self.settings = settings
        self._on_release = on_release
        self._released = self._streamed = False

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._on_release()

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc_info) -> None:
        """A route's `async with` block holds the lease: released when the block ends,
        unless a streamed response took it over."""
        if not self._streamed:
            self.release()

    def hand_to_stream(self) -> "Lease":
        """A streamed response takes the lease over; it releases it when the stream ends."""
        self._streamed = True
        return self


class Admission:
    """The generation slots and the queue before them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._slots: asyncio.Semaphore | None = None  # made on the event loop, at the first request
        self._waiting = 0

    def deadline(self) -> float:
        """When a request arriving now must have been answered (time.monotonic())."""
        return time.monotonic() + self.settings.request_timeout

    async def admit(self, deadline: float) -> None:
        """Wait for a slot; 429 when the queue is full, 503 past `deadline`."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent_requests)
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot is taken at once: this request never queues
            return
        if self._waiting >= self.settings.max_queued_requests:
            raise too_many_requests(self.settings.retry_after)
        self._waiting += 1

        async def acquire() -> None:
            try:
                await self._slots.acquire()
            finally:  # here, not after wait_for returns: a request that has its slot no longer fills the queue
                self._waiting -= 1

        try:
            await asyncio.wait_for(acquire(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise unavailable("The request timed out waiting for a free slot.", self.settings.retry_after, "timeout") from None

    def release(self) -> None:
        """Give back a slot `admit` granted."""
        self._slots.release()

    def queued(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting
