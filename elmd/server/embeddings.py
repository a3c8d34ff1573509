"""What every embeddings route shares (OpenAI's /v1/embeddings, Ollama's /api/embed and
/api/embeddings): a dialect checks its body and states an `EmbeddingRequest`; `embed` then
leases an embedding model through the manager (the same slots, queue limit, keep-alive and
memory budget as generation, so a flood gets 429), turns the inputs into token ids
(truncated or refused when over-long, as the request says), runs the encoder in a worker
thread within the request's deadline, and cuts the vectors to `dimensions` where the model
allows it. The dialect writes the vectors in its own shape."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from starlette.requests import Request

from elmd.engine.embedding import InputTooLong
from elmd.server.errors import APIError, invalid
from elmd.server.manager import ModelManager
from elmd.server.pipeline import until_done


@dataclass(frozen=True)
class EmbeddingRequest:
    """One embeddings request of any dialect: `inputs` are texts or token-id lists;
    `param`, `dimensions_param` name the fields a 400 points at, as the dialect spells them."""

    model: str
    keep_alive: tuple[bool, float | None]
    inputs: list[str] | list[list[int]]
    truncate: bool = False
    dimensions: int | None = None
    param: str = "input"
    dimensions_param: str = "dimensions"


@dataclass
class Embedded:
    vectors: torch.Tensor  # float32 [inputs, dimensions]
    prompt_tokens: int
    started: float  # time.monotonic() as the request began
    leased_at: float  # ... and when its model was ready (Ollama's load_duration is the difference)


async def embed(manager: ModelManager, request: EmbeddingRequest, http_request: Request) -> Embedded:
    started = time.monotonic()
    async with await manager.lease(request.model, request.keep_alive, kind="embedding") as lease:
        leased_at = time.monotonic()
        engine = lease.engine
        dimensions = check_dimensions(engine, request)
        if not request.inputs:
            return Embedded(torch.empty(0, dimensions), 0, started, leased_at)
        # One hop to the model's worker thread for both steps (each hop costs a thread wake-up).
        ids, vectors = await until_done(http_request, engine.in_worker(lambda: _embed(engine, request)), lease)
    if dimensions != vectors.shape[1]:
        vectors = vectors[:, :dimensions]
        if engine.normalize:
            vectors = F.normalize(vectors, dim=-1)
    return Embedded(vectors, sum(len(x) for x in ids), started, leased_at)


def _embed(engine, request: EmbeddingRequest) -> tuple[list[list[int]], torch.Tensor]:
    ids = token_ids(engine, request)
    return ids, engine.embed(ids)


def check_dimensions(engine, request: EmbeddingRequest) -> int:
    """The vector size the request gets: the model's, or fewer where it was trained for that."""
    size, wanted = engine.dimensions, request.dimensions
    if wanted is None or wanted == size:
        return size
    if not engine.matryoshka:
        raise invalid(f"The model '{request.model}' makes {size}-dimensional vectors and does not allow fewer: it "
                      f"was not trained for truncated (Matryoshka) embeddings. Leave '{request.dimensions_param}' "
                      f"out or set it to {size}.", param=request.dimensions_param, code="unsupported_value")
    if not 1 <= wanted <= size:
        raise invalid(f"'{request.dimensions_param}' must be between 1 and {size} for '{request.model}'.",
                      param=request.dimensions_param, code="invalid_value")
    return wanted


def token_ids(engine, request: EmbeddingRequest) -> list[list[int]]:
    """The inputs as token ids: texts tokenized with the model's special tokens, token ids as
    given. Over-long input is cut when the request asks (`truncate`), else a 400."""
    try:
        if isinstance(request.inputs[0], str):
            return engine.encode(request.inputs, truncate=request.truncate)
        ids = [list(x) for x in request.inputs]
        if request.truncate:
            ids = [x[: engine.max_length] for x in ids]
        engine.check(ids)
        return ids
    except InputTooLong as exc:
        where = request.param if len(request.inputs) == 1 else f"{request.param}[{exc.index}]"
        raise APIError(400, f"This model's maximum input length is {exc.max_length} tokens; '{where}' has "
                       f"{exc.length}. Shorten it or split it.", param=where, code="context_length_exceeded") from None
    except ValueError as exc:
        raise invalid(f"Invalid '{request.param}': {exc}.", param=request.param, code="invalid_value") from None
