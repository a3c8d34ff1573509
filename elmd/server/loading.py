"""Loading models in the background, and what /health says about it.

- A model loads on first use, in a worker thread, so loading one model never blocks
  requests to another; concurrent requests for a loading model wait for the same load.
- A model that `serve` installs at start (the offline default, converted from its package)
  installs in a worker thread after the daemon listens; requests for it wait, as for a load.
- A failed install or load is remembered until the model loads, for /health.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from typing import TYPE_CHECKING, Callable

from elmd.catalog import ModelSpec
from elmd.engine.protocol import describe_cpu_kernels
from elmd.engine.threads import in_own_thread
from elmd.server.errors import APIError, unavailable
from elmd.server.residency import Residency, Resident
from elmd.settings import Settings

if TYPE_CHECKING:
    from elmd.engine.engine import Engine, GenerationWatch

log = logging.getLogger("elmd.server")


class Loader:
    """One task per model being installed or loaded, which every request for it awaits, and
    the errors /health reports until the model loads."""

    def __init__(self, settings: Settings, residency: Residency, load: Callable[[ModelSpec], "Engine"]):
        self.settings, self.residency = settings, residency
        self._load_engine = load
        self.loading: dict[str, asyncio.Task] = {}
        self.installing: dict[str, asyncio.Task] = {}
        self.errors: dict[str, str] = {}
        self.loads: collections.Counter[str] = collections.Counter()  # successful loads per model
        # Given a model id and a prompt length, watches one generation; every engine loaded reports to it.
        self.generation_watch: Callable[[str, int], "GenerationWatch"] | None = None

    async def until_installed(self, model_id: str, deadline: float) -> None:
        task = self.installing.get(model_id)
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise unavailable(f"The model '{model_id}' is still being installed.", self.settings.retry_after,
                                  "model_loading") from None
            except Exception:
                pass  # the install failed: spec() answers 404, /health names the error

    async def ensure_loaded(self, spec: ModelSpec, deadline: float) -> Resident:
        """The resident model, loading it (after making room) unless it is loading already."""
        if spec.id in self.residency.models:
            return self.residency.models[spec.id]
        task = self.loading.get(spec.id)
        if task is None:
            await self.residency.make_room(spec, self.loading)
            if spec.id in self.residency.models:  # loaded by another request while we made room
                return self.residency.models[spec.id]
            task = self.loading.get(spec.id)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(spec))
                self.loading[spec.id] = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise unavailable(f"The model '{spec.id}' is still loading.", self.settings.retry_after, "model_loading") from None

    async def _load(self, spec: ModelSpec) -> Resident:
        self.residency.loading_bytes[spec.id] = spec.estimated_bytes()
        started = time.monotonic()
        try:
            engine = await in_own_thread(self._load_engine, spec)
        except Exception as exc:
            log.exception("loading %s from %s failed", spec.id, spec.path)
            self.errors[spec.id] = f"{type(exc).__name__}: {exc}"
            raise APIError(500, f"The model '{spec.id}' failed to load: {type(exc).__name__}: {exc}",
                           type="server_error", code="model_load_failed") from None
        finally:
            self.loading.pop(spec.id, None)
            self.residency.loading_bytes.pop(spec.id, None)
        self.errors.pop(spec.id, None)
        if self.generation_watch is not None:
            engine.watch = functools.partial(self.generation_watch, spec.id)
        self.loads[spec.id] += 1
        resident = self.residency.add(spec, engine)
        kernels = describe_cpu_kernels(engine.info.extra)
        log.info("loaded %s (%s, %.1f MB%s) in %.2fs", spec.id, engine.info.name, resident.memory_bytes / 1e6,
                 f", CPU kernels: {kernels}" if kernels else "", time.monotonic() - started)
        return resident

    def install(self, model_id: str, install: Callable[[], object]) -> None:
        """Run `install` (it puts `model_id` into the store) in a thread; requests wait for it."""
        self.installing[model_id] = asyncio.get_running_loop().create_task(self._install(model_id, install))

    async def _install(self, model_id: str, install: Callable[[], object]) -> None:
        started = time.monotonic()
        log.info("installing %s into the store (once, a few seconds); /health says loading until it is ready", model_id)
        try:
            await in_own_thread(install)
        except Exception as exc:
            log.exception("installing %s failed", model_id)
            self.errors[model_id] = f"install failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self.installing.pop(model_id, None)
        log.info("installed %s in %.1fs", model_id, time.monotonic() - started)

    async def settle(self) -> None:
        """Wait for the installs and loads under way (a thread cannot be cancelled: let it finish)."""
        for task in list(self.installing.values()):
            try:
                await task
            except BaseException:
                pass
        for task in list(self.loading.values()):
            try:
                await task
            except BaseException:
                pass

    # ------------------------------------------------------------------ reporting

    def in_progress(self) -> list[str]:
        """Models being installed or loaded."""
        return list(self.installing) + [m for m in self.loading if m not in self.installing]

    def cpu_kernels(self) -> dict:
        """Health's CPU kernel fields: the path of the loaded CPU models (one choice per
        process), the reason one of them is not on the best path, and whether it is building."""
        states = [r.engine.info.extra for r in self.residency.models.values()]
        states = [s for s in states if "cpu_kernels" in s]
        state = next((s for s in states if s["cpu_kernels_reason"]), states[0] if states else None)
        if state is None:
            return {}
        return {key: state[key] for key in ("cpu_kernels", "cpu_kernels_reason", "cpu_kernels_building")}
