"""Model names to model specs, in one place: the directory `serve` was started with (the
pinned model) and the store's models, each with its models.yaml entry. Whoever needs a
spec (serve, the model manager, the API's model routes) asks the catalog, so a model's
backend, dtype, quant, chat template and sampling defaults are decided once.

A name may also be a LoRA adapter, served as a model of its own over its base's loaded
weights: one of `serve --lora-modules` (over the model `serve` was started with) or one
kept in the store by `elmd import DIR --adapter-for BASE`. `resolve` is where every name,
model or adapter, is looked up.

A name never resolves to a path: only the operator's `serve` argument can be one."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from elmd.choices import pick_backend
from elmd.quant import Quant
from elmd.registry import ModelEntry, PackageSource, Registry
from elmd.settings import Settings
from elmd.store import InvalidModelName, Store, StoredModel

log = logging.getLogger("elmd.server")

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz")
ADAPTER_WEIGHTS = ("adapters.safetensors", "adapter_model.safetensors")  # mlx-lm's first, as elmd.engine.lora reads them


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load one servable model."""

    id: str
    path: Path
    backend: str  # "torch" | "mlx": `auto` decided
    dtype: str
    quant: Quant  # concrete for `backend` (a bare int4's group written out)
    chat_template: str | None = None
    defaults: dict = field(default_factory=dict)
    context_length: int | None = None  # from models.yaml; the loaded engine's is authoritative
    created: int = 0
    draft: str | None = None  # the model that guesses for this one (speculation): a name; Catalog.draft reads it
    kind: str = "generator"  # "generator" | "embedding" (a sentence encoder: the embeddings routes only)
    matryoshka: bool = False  # an embedding model whose vectors may be cut to fewer dimensions

    def estimated_bytes(self) -> int:
        """Resident size before loading: the weight files' size (a fair upper bound for
        unquantized weights, the common case)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter served as model `id`: its folder (mlx-lm's or PEFT's layout, read when it
    is first used) and the id of the model it adapts."""

    id: str
    path: Path
    base: str
    created: int = 0

    def weight_bytes(self) -> int:
        """Its weights file's size (mlx-lm's training checkpoints beside it not counted); 0 without one."""
        for name in ADAPTER_WEIGHTS:
            if (self.path / name).is_file():
                return (self.path / name).stat().st_size
        return 0


def model_kind(path: Path, entry: ModelEntry | None) -> str:
    """An entry's kind; without one, a folder in sentence-transformers' layout (modules.json)
    is an embedding model."""
    if entry is not None:
        return entry.kind
    return "embedding" if (path / "modules.json").is_file() else "generator"


def default_quant(entry: ModelEntry | None, manifest: dict | None = None) -> str:
    """The quant a model serves with unless the operator picks one, as spelled (a bare int4
    resolves per backend): what its install chose (the store's manifest), else its
    models.yaml entry's, else none. Installs (`pull`, `import`) and serving both ask this."""
    return (manifest or {}).get("default_quant") or (entry.default_quant if entry else "none")


def serving_quant(stored: StoredModel, registry: Registry) -> Quant:
    """The quant an installed model serves with here unless `serve --quant` says otherwise:
    what `elmd list` and `elmd show` print (the manifest's `quant` is what is stored)."""
    return Quant.parse(default_quant(registry.get(stored.name.split(":")[0]), stored.manifest), pick_backend())


class Catalog:
    def __init__(self, settings: Settings, registry: Registry, store: Store, pinned: ModelSpec | None = None,
                 started_with: str | None = None):
        """`started_with`: the model `serve` loads at start, whose adapters `--lora-modules` names
        (the pinned model's id where there is one)."""
        self.settings, self.registry, self.store, self.pinned = settings, registry, store, pinned
        self.started_with = started_with

    def lora_base(self) -> str | None:
        """The model the `--lora-modules` adapters adapt: the one `serve` was started with."""
        return self.pinned.id if self.pinned else self.started_with

    def entry(self, name: str) -> ModelEntry | None:
        """The models.yaml entry of a model name (a tag such as `:latest` ignored)."""
        return self.registry.get(name) or self.registry.get(name.split(":")[0])

    def draft(self, spec: ModelSpec) -> ModelSpec | None:
        """The installed model that guesses for `spec`, read from the store when `spec` loads
        (a request's lookup names it only); one not installed is said in the log, and the
        model serves with prompt lookup."""
        if not spec.draft:
            return None
        try:
            stored = self.store.get(spec.draft) if self.store.exists(spec.draft) else None
        except InvalidModelName:
            stored = None
        if stored is None or stored.adapter_for:
            log.warning("draft model %s is not installed: speculation uses prompt lookup (elmd pull %s)", spec.draft, spec.draft)
            return None
        return self.stored(stored)

    def directory(self, path: Path, model_id: str | None = None) -> ModelSpec:
        """A model directory the operator gave `serve`, served as `model_id` (default: its
        folder name), with the models.yaml entry it is named after (a hub checkout such as
        `OpenELM-1_1B-Instruct` gets `openelm-1.1b-instruct`'s)."""
        entry = self.registry.get(path.name.lower().replace("_", "."))
        model_id = model_id or path.name
        return self._spec(model_id, path, entry, default_quant(entry))

    def stored(self, stored: StoredModel) -> ModelSpec:
        entry = self.entry(stored.name)
        return self._spec(stored.name, stored.path, entry, default_quant(entry, stored.manifest))

    def _spec(self, model_id: str, path: Path, entry: ModelEntry | None, quant: str) -> ModelSpec:
        """The one place settings (first), the store's manifest and the models.yaml entry meet."""
        settings = self.settings
        backend = pick_backend(settings.backend)
        kind = model_kind(path, entry)
        draft = settings.draft or (entry.draft if entry else None)
        if not settings.speculation or draft in ("none", model_id) or kind == "embedding":
            draft = None
        return ModelSpec(
            id=model_id,
            path=path,
            backend=backend,
            dtype=entry.dtype if entry and settings.dtype == "auto" else settings.dtype,
            quant=Quant.parse(settings.quant or quant, backend),
            chat_template=entry.chat_template if entry else None,
            defaults=dict(entry.sampling) if entry else {},
            context_length=entry.context_length if entry else None,
            created=int(path.stat().st_mtime),
            draft=draft,
            kind=kind,
            matryoshka=bool(entry and entry.matryoshka),
        )

    def stored_adapter(self, stored: StoredModel) -> AdapterSpec:
        return AdapterSpec(stored.name, stored.path, stored.adapter_for, int(stored.path.stat().st_mtime))

    def lora_module(self, name: str) -> AdapterSpec | None:
        """Adapter `name` of `--lora-modules`, or None (a name it lacks, or no model to adapt)."""
        directory, base = self.settings.lora_modules.get(name), self.lora_base()
        if directory is None or base is None:
            return None
        created = int(directory.stat().st_mtime) if directory.is_dir() else 0  # removed since: a 400 at first use
        return AdapterSpec(name, directory, base, created)

    def specs(self) -> list[ModelSpec]:
        """The models this daemon can serve: the pinned one, then the store's (adapters apart)."""
        specs = [self.pinned] if self.pinned else []
        for stored in self.store.list():
            if (not self.pinned or stored.name != self.pinned.id) and not stored.adapter_for:
                specs.append(self.stored(stored))
        return specs

    def adapters(self) -> list[AdapterSpec]:
        """The LoRA adapters this daemon can serve: `--lora-modules`', then the store's."""
        adapters = [self.lora_module(name) for name in self.settings.lora_modules]
        adapters = [adapter for adapter in adapters if adapter is not None]
        shadowed = {adapter.id for adapter in adapters} | ({self.pinned.id} if self.pinned else set())
        return adapters + [self.stored_adapter(stored) for stored in self.store.list()
                           if stored.adapter_for and stored.name not in shadowed]

    def resolve(self, model_id: str) -> ModelSpec | AdapterSpec | None:
        """The model or adapter a request names, or None (paths and invalid names included): the
        pinned model, then `--lora-modules`, then the store."""
        if not isinstance(model_id, str):
            return None
        if self.pinned and model_id == self.pinned.id:
            return self.pinned
        if adapter := self.lora_module(model_id):
            return adapter
        try:
            if self.store.exists(model_id):
                stored = self.store.get(model_id)
                return self.stored_adapter(stored) if stored.adapter_for else self.stored(stored)
        except InvalidModelName:
            pass
        return None

    def find(self, model_id: str) -> ModelSpec | None:
        """The model (not adapter) a request names, or None."""
        found = self.resolve(model_id)
        return found if isinstance(found, ModelSpec) else None

    def installable(self, model_id: str) -> Callable[[], object] | None:
        """What installs `model_id` into the store without the network, or None: an embedding
        model of models.yaml that ships inside an installed Python package (the offline
        `all-minilm`), installed on its first request as the chat default is at `serve`."""
        entry = self.registry.get(model_id) if isinstance(model_id, str) else None
        if entry is None or entry.kind != "embedding" or self.find(model_id) is not None:
            return None
        source = entry.source_for(pick_backend(self.settings.backend))
        if not isinstance(source.weights, PackageSource) or source.weights.locate() is None:
            return None
        from elmd.pull import pull

        return functools.partial(pull, model_id, entry, self.store, progress=False)

    def embedding_models(self) -> list[str]:
        """The embedding models a request may name: installed, or installable offline."""
        installed = [spec.id for spec in self.specs() if spec.kind == "embedding"]
        offline = [entry.id for entry in self.registry
                   if entry.kind == "embedding" and entry.id not in installed and self.installable(entry.id)]
        return installed + offline

    def is_pinned(self, model_id: str) -> bool:
        return self.pinned is not None and model_id == self.pinned.id
