"""Request-scoped access to the app's shared objects (FastAPI dependencies)."""

from __future__ import annotations

from fastapi import Request

from elmd.server.manager import ModelManager


async def get_manager(request: Request) -> ModelManager:
    """Async, so that FastAPI calls it on the event loop: a plain function it would run on its
    thread pool, one thread hop per request for an attribute lookup."""
    return request.app.state.manager
