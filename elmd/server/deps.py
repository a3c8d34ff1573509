"""Request-scoped access to the app's shared objects (FastAPI dependencies)."""

from __future__ import annotations

from fastapi import Request

from elmd.server.manager import ModelManager
from elmd.settings import Settings


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


def get_settings(request: Request) -> Settings:
    return request.app.state.settings
