"""The FastAPI application: `create_app(settings, manager)` builds the whole service, so
the CLI and the tests run exactly the same app."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI

from elmd import __version__
from elmd.server import errors, metrics, page, security
from elmd.server.anthropic import routes as anthropic
from elmd.server.manager import ModelManager
from elmd.server.ollama import embed as ollama_embed, generate as ollama_generate, models as ollama_models
from elmd.server.openai import chat, completions, embeddings, models, tokenize
from elmd.server.responses import routes as responses
from elmd.server.responses.store import ResponseStore
from elmd.settings import Settings


def create_app(settings: Settings, manager: ModelManager, preload: str | None = None,
               install: Callable[[], object] | None = None) -> FastAPI:
    """The daemon's app. `preload` names a model to start loading at startup (GET /health
    answers 503 until it is ready), after `install` (run in a thread) has put it in the store."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.start(preload, install)
        try:
            yield
        finally:
            await manager.close()

    # No /docs or /redoc: those pages run JavaScript from a CDN on the daemon's own origin,
    # where it could call the API. /openapi.json stays (schema only, behind the key).
    app = FastAPI(title="elmd", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.manager = manager
    app.state.responses = ResponseStore()
    errors.install(app)
    security.install(app, settings)
    metrics.install(app, manager)  # after security: its request counter runs first, so refusals count too
    for module in (models, chat, completions, embeddings, tokenize, responses, anthropic, ollama_generate,
                   ollama_embed, ollama_models, page):
        app.include_router(module.router)
    return app
