"""Which models are resident, for how long, and whether another one fits.

An idle model unloads after its keep-alive (the setting, or the last request's Ollama-style
`keep_alive`); a memory budget and a count cap resident models, evicting the least recently
used idle one to make room. The budget counts what each model holds as it grows (weights,
KV cache, cached prefixes) and the models being loaded at their estimated size, and each
backend keeps its cache within what the budget leaves it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil

from elmd.catalog import ModelSpec
from elmd.server.errors import APIError, unavailable
from elmd.settings import Settings

if TYPE_CHECKING:
    from elmd.engine.engine import Engine

log = logging.getLogger("elmd.server")

REAP_INTERVAL = 0.25


@functools.cache
def _total_memory() -> int:
    """The machine's memory, read once (the budget is asked for at every lease)."""
    return psutil.virtual_memory().total


@dataclass
class Resident:
    spec: ModelSpec
    engine: "Engine"
    keep_alive: float | None  # seconds idle before it unloads; None: never
    active: int = 0  # leases held
    last_used: float = field(default_factory=time.monotonic)

    @property
    def memory_bytes(self) -> int:
        return self.engine.resident_bytes()


def _has_idle_adapter(resident: Resident, now: float) -> bool:
    """Whether an adapter of `resident` has gone unused for its keep-alive, its own or the
    model's (read without the engine's lock: the reaper asks four times a second)."""
    adapters = getattr(resident.engine, "adapters", {})  # an embedding model has none
    return any(loaded.idle_past(now, resident.keep_alive) for loaded in list(adapters.values()))


class Residency:
    """The resident models and the one memory budget they share, so that loads (make_room)
    and growing caches (fit_budget, cache_budget) are weighed against the same figures."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, Resident] = {}
        self.loading_bytes: dict[str, int] = {}  # the models loading now, at their estimated size (the loader's)
        self.unloads: collections.Counter[str] = collections.Counter()

    def add(self, spec: ModelSpec, engine: "Engine") -> Resident:
        """A model just loaded; its backend keeps its cache within what the budget leaves it."""
        resident = Resident(spec, engine, self.settings.keep_alive)
        self.models[spec.id] = resident
        engine.limit_cache(functools.partial(self.cache_budget, resident))
        return resident

    def release(self, resident: Resident, keep_alive: tuple[bool, float | None]) -> bool:
        """A lease on `resident` ended, with the request's keep-alive if it gave one; True
        when the model should unload now (idle, keep-alive 0)."""
        resident.active -= 1
        resident.last_used = time.monotonic()
        given, seconds = keep_alive
        if given:
            resident.keep_alive = seconds
        return resident.active == 0 and resident.keep_alive == 0

    # ------------------------------------------------------------------ the memory budget

    def memory_budget(self) -> int:
        if self.settings.memory_budget_bytes is not None:
            return self.settings.memory_budget_bytes
        return _total_memory() // 2

    def cache_budget(self, resident: Resident) -> int:
        """Bytes `resident`'s KV cache and cached prefixes may take now: the budget less its
        weights, the other models' current size, and the models being loaded."""
        others = sum(r.memory_bytes for r in list(self.models.values()) if r is not resident)
        loading = sum(list(self.loading_bytes.values()))
        return self.memory_budget() - resident.engine.info.memory_bytes - others - loading

    async def make_room(self, spec: ModelSpec, loading: Sized) -> None:
        """Unload idle models, least recently used first, until `spec` fits the count (with
        the `loading` ones) and the memory budget; 503 if it cannot fit because the others are busy."""
        need, budget = spec.estimated_bytes(), self.memory_budget()
        if need > budget:
            raise APIError(503, f"The model '{spec.id}' needs about {need >> 20} MiB, more than the memory budget "
                           f"of {budget >> 20} MiB (ELMD_MEMORY_BUDGET_BYTES).", type="server_error", code="insufficient_memory")
        while True:
            used = sum(r.memory_bytes for r in self.models.values()) + sum(self.loading_bytes.values())
            count = len(self.models) + len(loading)
            if count < self.settings.max_loaded_models and used + need <= budget:
                return
            if not await self._unload_least_recent(f"to make room for {spec.id}"):
                raise unavailable("All loaded models are busy and no other model fits; retry shortly.",
                                  self.settings.retry_after, "model_capacity")

    async def fit_budget(self, resident: Resident) -> None:
        """Unload idle models, least recently used first, while the resident ones (grown
        since they loaded) pass the budget, so that `resident`'s cache has room to grow."""
        while sum(r.memory_bytes for r in self.models.values()) > self.memory_budget():
            if not await self._unload_least_recent("the resident models have grown past the memory budget", resident):
                return  # the busy ones' caches are held within what is left by their backends

    async def _unload_least_recent(self, why: str, keep: Resident | None = None) -> bool:
        """Unload the least recently used idle model other than `keep`; False when none is idle."""
        idle = [r for r in self.models.values() if r.active == 0 and r is not keep]
        if not idle:
            return False
        victim = min(idle, key=lambda r: r.last_used)
        log.info("unloading %s: %s", victim.spec.id, why)
        await self.unload(victim)
        return True

    # ------------------------------------------------------------------ unloading

    async def unload(self, resident: Resident) -> None:
        if self.models.get(resident.spec.id) is resident:
            del self.models[resident.spec.id]
            await asyncio.to_thread(resident.engine.close)
            self.unloads[resident.spec.id] += 1
            log.info("unloaded %s", resident.spec.id)

    async def unload_when_idle(self, model_id: str) -> None:
        """Unload a resident model now, or as soon as its running requests finish."""
        resident = self.models.get(model_id)
        if resident is None:
            return
        resident.keep_alive = 0
        if resident.active == 0:
            await self.unload(resident)

    async def unload_if_idle(self, resident: Resident) -> None:
        if resident.active == 0:
            await self.unload(resident)

    async def reap(self) -> None:
        """Unload models idle past their keep-alive, and the LoRA adapters of the others unused
        past theirs (an adapter is a model of its own to its clients: the keep_alive of its last
        request, else its base model's)."""
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.monotonic()
            for resident in list(self.models.values()):
                if resident.keep_alive is not None and resident.active == 0 and now - resident.last_used >= resident.keep_alive:
                    await self.unload(resident)
                elif _has_idle_adapter(resident, now):
                    await self._drop_idle_adapters(resident)

    async def _drop_idle_adapters(self, resident: Resident) -> None:
        """In a thread: unloading an adapter waits for the model's worker. A failure is logged,
        never raised: the reaper must outlive it (the model may have unloaded meanwhile)."""
        try:
            dropped = await asyncio.to_thread(resident.engine.drop_idle_adapters, resident.keep_alive)
        except Exception:
            log.exception("unloading the idle adapters of %s failed", resident.spec.id)
            return
        for name in dropped:
            log.info("unloaded adapter %s of %s", name, resident.spec.id)

    async def close(self) -> None:
        for resident in list(self.models.values()):
            await self.unload(resident)

    # ------------------------------------------------------------------ reporting

    def expires_at(self, model_id: str) -> float | None:
        """When a resident model unloads unless another request comes (as time.time());
        None: never (keep_alive -1)."""
        resident = self.models[model_id]
        if resident.keep_alive is None:
            return None
        idle_since = time.monotonic() if resident.active else resident.last_used
        return time.time() + idle_since + resident.keep_alive - time.monotonic()
