"""Shared fixtures: an isolated ELMD_HOME, a generated tiny OpenELM checkpoint, and the
real daemon (create_app + uvicorn) on an ephemeral port in a background thread."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

TINY_MODEL = "tiny-openelm"


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory) -> Iterator[Path]:
    """Every test runs against a throwaway ELMD_HOME and never reaches the hub."""
    home = tmp_path_factory.mktemp("elmd-home")
    saved = {k: os.environ.get(k) for k in ("ELMD_HOME", "HF_HUB_OFFLINE")}
    os.environ["ELMD_HOME"], os.environ["HF_HUB_OFFLINE"] = str(home), "1"
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A deterministic tiny OpenELM checkpoint with its LLaMA-style fixture tokenizer."""
    from elmd.fixtures import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / TINY_MODEL, shape="tiny", seed=0)


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    app: object
    manager: object

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def wait_healthy(self, seconds: float = 60, what: str = "the model") -> None:
        """Poll /health until it answers 200 (the preloaded model is ready)."""
        import httpx

        deadline = time.monotonic() + seconds
        while httpx.get(f"{self.base_url}/health").status_code != 200:
            assert time.monotonic() < deadline, f"{what} did not load"
            time.sleep(0.05)


def sse(response) -> list[tuple[str | None, dict]]:
    """(event name, data) of each server-sent event of a finished response, in order."""
    events = []
    for block in response.text.split("\n\n"):
        lines = block.split("\n")
        name = next((line[len("event: "):] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[len("data: "):] for line in lines if line.startswith("data: "))
        if data:
            events.append((name, json.loads(data)))
    return events


@contextmanager
def serve_app(app, manager) -> Iterator[RunningServer]:
    """Run `app` with uvicorn on 127.0.0.1 and an ephemeral port until the block exits."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="elmd-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app, manager)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def build_app(checkpoint: Path | None = None, model_id: str = TINY_MODEL, preload: bool = True, loader=None,
              store_root: Path | None = None, **settings_overrides):
    """The daemon's real app over `checkpoint` (served as `model_id`) and the store
    (`store_root`, default: the one under ELMD_HOME)."""
    from elmd.catalog import Catalog
    from elmd.registry import Registry
    from elmd.server.app import create_app
    from elmd.server.manager import ModelManager
    from elmd.settings import Settings
    from elmd.store import Store

    settings = Settings(**{"backend": "torch", **settings_overrides})
    catalog = Catalog(settings, Registry.load(), Store(store_root))
    if checkpoint is not None:
        catalog.pinned = catalog.directory(checkpoint, model_id)
    extra = {"loader": loader} if loader is not None else {}
    manager = ModelManager(settings, catalog, **extra)
    return create_app(settings, manager, preload=model_id if (catalog.pinned and preload) else None), manager


@pytest.fixture
def start_server():
    """Start a server with custom settings: `start_server(checkpoint, **settings)`; stopped after the test."""
    stack = []

    def start(checkpoint: Path | None = None, **kwargs) -> RunningServer:
        app, manager = build_app(checkpoint, **kwargs)
        context = serve_app(app, manager)
        running = context.__enter__()
        stack.append(context)
        return running

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    """The daemon serving the tiny checkpoint as `tiny-openelm` (loaded before the first
    test), beside an empty store of its own."""
    app, manager = build_app(tiny_checkpoint, store_root=tmp_path_factory.mktemp("server-store"), keep_alive=-1)
    with serve_app(app, manager) as running:
        running.wait_healthy(what="the tiny model")
        yield running


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """The fixture tokenizer (LLaMA-2 layout) on its own, for tokenizer and template tests."""
    from elmd.fixtures.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    from elmd.engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(tok_dir)
