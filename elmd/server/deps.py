"""Request-scoped access to the app's shared objects (FastAPI dependencies)."""

from __future__ import annotations

from fastapi import Request

from elmd.server.manager import ModelManager


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager
