"""Ollama's embeddings routes on the embedding models (elmd/server/embeddings.py does the work):
POST /api/embed (`input` a text or texts; `truncate`, default true; `keep_alive`; `options`
ignored; `{model, embeddings, total_duration, load_duration, prompt_eval_count}`) and the
older POST /api/embeddings (`prompt` -> `{embedding}`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from elmd.server import errors
from elmd.server.deps import get_manager
from elmd.server.embeddings import EmbeddingRequest, embed
from elmd.server.manager import ModelManager
from elmd.server.ollama.common import NS, model_id
from elmd.server.ollama.schemas import (OllamaEmbeddingsRequest, OllamaEmbeddingsResponse, OllamaEmbedRequest,
                                        OllamaEmbedResponse)

router = APIRouter()


@router.post("/api/embed", response_model=OllamaEmbedResponse, responses=errors.ollama_responses(*errors.GENERATION))
async def embed_route(body: OllamaEmbedRequest, request: Request, manager: ModelManager = Depends(get_manager)):
    name = model_id(manager, body.model)
    done = await embed(manager, EmbeddingRequest(model=name, keep_alive=body.keep_alive_seconds(), inputs=body.inputs(),
                                                 truncate=body.truncate, dimensions=body.dimensions), request)
    answer = OllamaEmbedResponse(model=body.model, embeddings=done.vectors.double().tolist(),
                                 total_duration=int((time.monotonic() - done.started) * NS),
                                 load_duration=int((done.leased_at - done.started) * NS),
                                 prompt_eval_count=done.prompt_tokens)
    return Response(answer.model_dump_json(), media_type="application/json")


@router.post("/api/embeddings", response_model=OllamaEmbeddingsResponse,
             responses=errors.ollama_responses(*errors.GENERATION))
async def embeddings_route(body: OllamaEmbeddingsRequest, request: Request,
                           manager: ModelManager = Depends(get_manager)):
    name = model_id(manager, body.model)
    inputs = [body.prompt] if body.prompt else []
    done = await embed(manager, EmbeddingRequest(model=name, keep_alive=body.keep_alive_seconds(), inputs=inputs,
                                                 truncate=True, param="prompt"), request)
    embedding = done.vectors[0].double().tolist() if inputs else []
    return Response(OllamaEmbeddingsResponse(embedding=embedding).model_dump_json(), media_type="application/json")
