"""Ollama's model endpoints: GET /api/tags (installed), GET /api/ps (loaded), POST /api/show,
GET /api/version, POST /api/pull, DELETE /api/delete (the embeddings routes are in embed.py).
A LoRA adapter is listed and shown as a model of its own whose `details.parent_model` is its
base (and whose Modelfile says `ADAPTER`, as Ollama's own do).

The daemon itself never touches the network: /api/pull runs `elmd pull` as a child
process (the one command that downloads, for models named in models.yaml only) and
streams its progress."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from safetensors import SafetensorError, safe_open

from elmd.engine.engine import chat_template_of
from elmd.engine.protocol import context_length
from elmd.offline import OFFLINE_ENVIRONMENT
from elmd.server import errors
from elmd.server.deps import get_manager
from elmd.server.errors import APIError, invalid
from elmd.catalog import ADAPTER_WEIGHTS, AdapterSpec, ModelSpec
from elmd.server.manager import ModelManager
from elmd.server.ollama.common import NS, model_id, timestamp
from elmd.server.ollama.schemas import (OllamaModel, OllamaModelDetails, OllamaModelRequest,
                                        OllamaPullRequest, OllamaRunning, OllamaRunningModel, OllamaShow,
                                        OllamaStatus, OllamaTags, OllamaVersion)
from elmd.server.streaming import NDJSON, ndjson_response, streamed
from elmd.store import MANIFEST, InvalidModelName, ModelNotFound, UnsafeModelFile, resolve_inside, validate_name

router = APIRouter()

# The Ollama release whose API these routes follow; clients gate features on it.
OLLAMA_API_VERSION = "0.12.0"
# What Ollama reports for `keep_alive: -1`: its longest duration (2^63-1 ns) from now.
FOREVER_SECONDS = (2**63 - 1) / NS


def _config(spec: ModelSpec) -> dict:
    try:
        return json.loads(resolve_inside(spec.path.resolve(), "config.json").read_text())
    except (OSError, ValueError, UnsafeModelFile):
        return {}


def _parameter_count(spec: ModelSpec) -> int:
    """From the safetensors headers (no tensor is read); elmd's quantized caches excluded."""
    total = 0
    for path in sorted(spec.path.glob("*.safetensors")):
        if path.name.startswith("elmd-") or not path.resolve().is_relative_to(spec.path.resolve()):
            continue
        try:
            with safe_open(path, "numpy") as weights:
                for name in weights.keys():
                    count = 1
                    for size in weights.get_slice(name).get_shape():
                        count *= size
                    total += count
        except (OSError, SafetensorError):  # a damaged file: listed all the same, it fails to load
            continue
    return total


def _parameter_size(count: int) -> str:
    """"270.0M", "1.1B": as Ollama writes parameter sizes."""
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _digest(spec: ModelSpec) -> str:
    """A stable id of the installed files: the manifest's (or config's) sha256."""
    for name in (MANIFEST, "config.json"):
        path = spec.path / name
        if path.is_file() and not path.is_symlink():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(str(spec.path).encode()).hexdigest()


def _adapter_digest(adapter: AdapterSpec) -> str:
    """A stored adapter's manifest's sha256; else that of its config and weights (small files)."""
    names = [MANIFEST] if (adapter.path / MANIFEST).is_file() else ["adapter_config.json", *ADAPTER_WEIGHTS]
    digest = hashlib.sha256()
    for path in (adapter.path / name for name in names):
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _details(spec: ModelSpec) -> OllamaModelDetails:
    family = _config(spec).get("model_type", "openelm")
    return OllamaModelDetails(format="safetensors", family=family, families=[family],
                              parameter_size=_parameter_size(_parameter_count(spec)), quantization_level=str(spec.quant))


def _adapter_details(adapter: AdapterSpec, base: ModelSpec | None) -> OllamaModelDetails:
    """The base's details (its family, size and quantization are what runs), naming it the parent."""
    details = _details(base) if base else OllamaModelDetails(format="safetensors", family="openelm", families=["openelm"],
                                                              parameter_size="", quantization_level="")
    return details.model_copy(update={"parent_model": adapter.base})


def _entry(spec: ModelSpec) -> dict:
    return dict(name=spec.id, model=spec.id, size=spec.estimated_bytes(), digest=_digest(spec), details=_details(spec))


def _adapter_entry(adapter: AdapterSpec, base: ModelSpec | None) -> dict:
    return dict(name=adapter.id, model=adapter.id, size=adapter.weight_bytes(), digest=_adapter_digest(adapter),
                details=_adapter_details(adapter, base))


def _requested(body: OllamaModelRequest) -> str:
    name = body.model_name()
    if not name:
        raise invalid("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    return name


@router.get("/api/version", response_model=OllamaVersion, responses=errors.ollama_responses())
async def version() -> OllamaVersion:
    return OllamaVersion(version=OLLAMA_API_VERSION)


@router.get("/api/tags", response_model=OllamaTags, responses=errors.ollama_responses())
async def tags(manager: ModelManager = Depends(get_manager)) -> OllamaTags:
    catalog = manager.catalog
    specs = catalog.specs()
    bases = {spec.id: spec for spec in specs}
    adapters = [OllamaModel(**_adapter_entry(adapter, bases.get(adapter.base)), modified_at=timestamp(adapter.created))
                for adapter in catalog.adapters()]
    return OllamaTags(models=[OllamaModel(**_entry(spec), modified_at=timestamp(spec.created)) for spec in specs] + adapters)


@router.get("/api/ps", response_model=OllamaRunning, responses=errors.ollama_responses())
async def running(manager: ModelManager = Depends(get_manager)) -> OllamaRunning:
    models = []
    for name, engine in sorted(manager.loaded().items()):
        try:
            spec = manager.spec(name)
        except APIError:  # removed from the store while loaded (`elmd rm`); it unloads when idle
            continue
        forever = time.time() + FOREVER_SECONDS  # also the cap: a longer keep_alive has no date Ollama can write
        expires = manager.expires_at(name)
        info = engine.info
        size = engine.resident_bytes()
        models.append(OllamaRunningModel(
            **{**_entry(spec), "size": size}, size_vram=0 if info.device in ("cpu", "mlx-cpu") else size,
            expires_at=timestamp(forever if expires is None else min(expires, forever)),
            context_length=engine.context_length,
        ))
    return OllamaRunning(models=models)


@router.post("/api/show", response_model=OllamaShow, responses=errors.ollama_responses(400, 404, 503))
async def show(body: OllamaModelRequest, manager: ModelManager = Depends(get_manager)) -> OllamaShow:
    spec, adapter = manager.target(model_id(manager, _requested(body)))
    details = _adapter_details(adapter, spec) if adapter else _details(spec)
    engine = manager.loaded().get(spec.id)
    config = _config(spec)
    if spec.kind == "embedding":  # no chat template: an encoder answers /api/embed only
        context = engine.context_length if engine else spec.context_length or (config or {}).get("max_position_embeddings")
        template = ""
    else:
        context = engine.context_length if engine else spec.context_length or (context_length(config) if config else None)
        template = await asyncio.to_thread(_chat_template, spec) if engine is None else engine.tokenizer.chat_template
    parameters = "\n".join(f"{key} {value}" for key, value in sorted(spec.defaults.items()))
    return OllamaShow(
        modelfile=f"# elmd serves this model from {spec.path}\nFROM {spec.path}\n"
                  + (f"ADAPTER {adapter.path}\n" if adapter else "")
                  + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
        parameters=parameters,
        template=template,
        details=details,
        model_info={"general.architecture": details.family, "general.parameter_count": _parameter_count(spec),
                    f"{details.family}.context_length": context},
        # tools: elmd/server/tools.py, for every generator
        capabilities=["embedding"] if spec.kind == "embedding" else ["completion", "tools"],
        modified_at=timestamp((adapter or spec).created),
    )


def _chat_template(spec: ModelSpec) -> str:
    return chat_template_of(spec.path, spec.chat_template)


@router.delete("/api/delete", response_class=Response, responses={200: {"description": "Deleted (no body)."},
                                                                 **errors.ollama_responses(400, 404)})
async def delete(body: OllamaModelRequest, manager: ModelManager = Depends(get_manager)) -> Response:
    name = model_id(manager, _requested(body))
    if manager.catalog.is_pinned(name):
        raise APIError(400, f"model '{name}' is served from a directory given to `elmd serve`, not from the store; "
                       "it cannot be deleted through the API", param="model")
    try:
        manager.catalog.store.get(name)
    except (ModelNotFound, InvalidModelName):
        raise APIError(404, f"model '{name}' not found", param="model", code="model_not_found") from None
    await manager.unload(name)
    await asyncio.to_thread(manager.catalog.store.remove, name)
    return Response(status_code=200)


@router.post("/api/pull", response_model=None, responses={**streamed(OllamaStatus, OllamaStatus, NDJSON),
                                                        **errors.ollama_responses(400, 404, 500)})
async def pull(body: OllamaPullRequest, manager: ModelManager = Depends(get_manager)):
    name = _requested(body).removesuffix(":latest")
    try:
        validate_name(name)
    except InvalidModelName as exc:
        raise invalid(str(exc), param="model") from None
    if manager.catalog.registry.get(name) is None:
        known = ", ".join(entry.id for entry in manager.catalog.registry)
        raise APIError(404, f"models.yaml has no model '{name}' (known: {known})", param="model",
                       code="model_not_found")
    events = _pull_progress(name, manager.settings.backend, manager.catalog.store.exists(name))
    if body.stream:
        return ndjson_response(events, None, error=APIError.ollama_body)
    last = None
    async for last in events:
        pass
    return last


def pull_environment() -> dict[str, str]:
    """The daemon's environment without its offline switches (telemetry opt-outs kept)."""
    offline = {key for key in OFFLINE_ENVIRONMENT if key.endswith("_OFFLINE")}
    return {key: value for key, value in os.environ.items() if key not in offline}


async def _pull_progress(name: str, backend: str, installed: bool) -> AsyncIterator[OllamaStatus]:
    """`elmd pull NAME` in a child process, its progress lines as Ollama's status objects."""
    yield OllamaStatus(status="pulling manifest")
    if installed:
        yield OllamaStatus(status="success")
        return
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "elmd", "pull", name, "--quiet", "--backend", backend,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=pull_environment(),
    )
    last = ""
    try:
        async for raw in child.stderr:
            line = raw.decode(errors="replace").strip()
            if line:
                last = line
                yield OllamaStatus(status=_status(line))
        await child.wait()
    finally:
        if child.returncode is None:  # the client went away: stop (a later pull resumes)
            child.terminate()
            await child.wait()
    if child.returncode != 0:
        raise APIError(500, last.removeprefix("elmd pull: error: ") or f"elmd pull exited with {child.returncode}",
                       type="server_error", code="pull_failed")
    yield OllamaStatus(status="success")


def _status(line: str) -> str:
    """`repo@commit: path (size of total)` -> `pulling path`; other lines as they are."""
    head, sep, rest = line.partition(": ")
    if sep and "@" in head and " (" in rest:
        return f"pulling {Path(rest.split(' (')[0]).name}"
    return line
