"""POST /v1/embeddings: OpenAI's embeddings API on the embedding models (elmd/server/embeddings.py
does the work); vectors as float lists or, with `encoding_format: base64`, as base64 of their
little-endian float32 bytes (what OpenAI's SDKs ask for by default and decode)."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from elmd.server import errors, pipeline
from elmd.server.deps import get_manager
from elmd.server.embeddings import EmbeddingRequest as Embedding, embed
from elmd.server.manager import ModelManager
from elmd.server.openai.schemas import EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingList, responses=errors.responses(*errors.GENERATION))
async def create_embeddings(body: EmbeddingRequest, request: Request,
                            manager: ModelManager = Depends(get_manager)) -> Response:
    pipeline.reject_unsupported(body)
    done = await embed(manager, Embedding(model=body.model, keep_alive=body.keep_alive_seconds(), inputs=body.inputs(),
                                          dimensions=body.dimensions), request)
    vectors = done.vectors.numpy()
    if body.encoding_format == "base64":
        rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    else:
        rows = vectors.astype(np.float64).tolist()
    answer = EmbeddingList(data=[EmbeddingData(index=i, embedding=row) for i, row in enumerate(rows)], model=body.model,
                           usage=EmbeddingUsage(prompt_tokens=done.prompt_tokens, total_tokens=done.prompt_tokens))
    # Written here, not by FastAPI's response_model (which validates the body again first):
    # a batch of vectors is thousands of floats.
    return Response(answer.model_dump_json(), media_type="application/json")
