"""GET /v1/models, /v1/models/{id}: what this daemon can serve and what is loaded (LoRA
adapters too, with `parent` their base model, as vLLM lists them); GET /health: 200 when a model is ready (or none is loading), 503 while loading; which CPU
kernels the loaded models run on."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from elmd.server import errors
from elmd.server.deps import get_manager
from elmd.catalog import AdapterSpec, ModelSpec
from elmd.server.manager import ModelManager
from elmd.server.openai.schemas import Health, ModelCard, ModelList

router = APIRouter()


def _card(manager: ModelManager, spec: ModelSpec) -> ModelCard:
    engine = manager.loaded().get(spec.id)
    return ModelCard(
        id=spec.id,
        created=spec.created,
        owned_by="elmd",
        loaded=engine is not None,
        context_length=engine.context_length if engine else spec.context_length,
        backend=engine.info.name if engine else None,
        memory_bytes=engine.resident_bytes() if engine else None,
    )


def _adapter_card(manager: ModelManager, adapter: AdapterSpec) -> ModelCard:
    """Loaded: read into its base, which is resident (its memory is counted in the base's)."""
    base = manager.loaded().get(adapter.base)
    loaded = getattr(base, "adapters", {}).get(adapter.id)
    if loaded is not None and loaded.directory != adapter.path:  # the name has meant another folder since
        loaded = None
    return ModelCard(
        id=adapter.id,
        created=adapter.created,
        owned_by="elmd",
        loaded=loaded is not None,
        context_length=base.context_length if base else None,
        backend=base.info.name if base else None,
        memory_bytes=loaded.nbytes if loaded else None,
        parent=adapter.base,
        root=str(adapter.path),
    )


def _card_for(manager: ModelManager, found: ModelSpec | AdapterSpec) -> ModelCard:
    return _adapter_card(manager, found) if isinstance(found, AdapterSpec) else _card(manager, found)


@router.get("/v1/models", response_model=ModelList, responses=errors.responses())
async def list_models(manager: ModelManager = Depends(get_manager)) -> ModelList:
    catalog = manager.catalog
    return ModelList(data=[_card_for(manager, found) for found in [*catalog.specs(), *catalog.adapters()]])


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=errors.responses(404, 503))
async def get_model(model_id: str, manager: ModelManager = Depends(get_manager)) -> ModelCard:
    return _card_for(manager, manager.resolve(model_id))


@router.get("/health", response_model=Health, responses={
    503: {"model": Health, "description": "A model is loading, or failed to load (`error`)."},
    **errors.responses(keyed=False)})
async def health(manager: ModelManager = Depends(get_manager)):
    loaded, loading, failures = sorted(manager.loaded()), manager.loading(), manager.errors()
    if loaded:
        return Health(status="ok", loaded=loaded, loading=loading, **manager.cpu_kernels())
    if loading:
        return JSONResponse(Health(status="loading", loaded=[], loading=loading).model_dump(), status_code=503)
    if failures:
        message = "; ".join(f"{model}: {error}" for model, error in failures.items())
        return JSONResponse(Health(status="error", loaded=[], loading=[], error=message).model_dump(), status_code=503)
    return Health(status="ok", loaded=[], loading=[])
