"""The one pipeline under every API dialect. A dialect (openai/, responses/, ollama/)
checks its body, renders its prompt and translates its fields into a `GenerationRequest`;
`admit` then runs what every generation needs, in one order: lease the model (loading it,
queueing, keep_alive), encode the prompt, settle max_tokens (the request's, the model's
default, or the context's room), check the context, and build one SamplingParams per
choice. The dialect turns the engine's chunks back into its own wire format, streamed or
waited for (`Admitted.wait`), within the request's deadline."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, TypeVar

from starlette.requests import Request

from elmd.engine.engine import ContextLengthError, Engine, GrammarError
from elmd.engine.protocol import Constraint, SamplingParams
from elmd.server.admission import Lease
from elmd.server.errors import APIError, invalid, timed_out, unsupported
from elmd.server.manager import ModelManager

T = TypeVar("T")

# max_tokens that asks for the whole context (Ollama's num_predict -1 and -2): the model's
# max_tokens default does not apply.
FILL_CONTEXT = "context"


def reject_unsupported(body) -> None:
    """400 for a parameter nobody defined (OpenAI's wording), a feature elmd does not
    implement or a contradictory combination, by name. Every dialect's request has
    `unrecognized_params`, `unsupported_params` and `invalid_params`."""
    for name in body.unrecognized_params():
        raise invalid(f"Unrecognized request argument supplied: {name}", param=name)
    names = body.unsupported_params()
    if names:
        raise unsupported(names[0])
    for param, message in body.invalid_params():
        raise invalid(message, param=param)


@dataclass(frozen=True)
class GenerationRequest:
    """One request of any dialect, in the pipeline's terms. `encode` turns the dialect's
    prompt into token ids on the model's tokenizer (one list per prompt: only completions
    sends several); `*_param` name the fields a 400 points at, as the dialect spells them."""

    model: str
    keep_alive: tuple[bool, float | None]
    encode: Callable[[Engine], list[list[int]]]
    prompt_param: str
    sampling: dict[str, Any]  # SamplingOptions.values(): what the request set
    max_tokens: int | Literal["context"] | None = None  # None: the model's default
    max_tokens_param: str = "max_tokens"
    n: int = 1
    logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    constraint: Constraint | None = None


@dataclass
class Admitted:
    """A request that holds its model: its prompts as token ids and one SamplingParams per
    choice. `leased_at` is when the model was ready for it (Ollama's load_duration)."""

    lease: Lease
    prompts: list[list[int]]
    params: list[SamplingParams]
    leased_at: float = field(default_factory=time.monotonic)

    @property
    def engine(self) -> Engine:
        return self.lease.engine

    async def wait(self, request: Request, work: Awaitable[T]) -> T:
        return await until_done(request, work, self.lease)


@asynccontextmanager
async def admit(manager: ModelManager, request: GenerationRequest) -> AsyncIterator[Admitted]:
    """The request with its model leased for as long as the block runs (a stream takes the
    lease over with `sse_response`/`ndjson_response`)."""
    async with await manager.lease(request.model, request.keep_alive) as lease:
        leased_at = time.monotonic()
        engine = lease.engine
        prompts = request.encode(engine)
        longest = max(prompts, key=len)
        if request.max_tokens == FILL_CONTEXT:
            max_tokens = context_room(engine, longest)
        else:
            max_tokens = default_max_tokens(engine, longest) if request.max_tokens is None else request.max_tokens
        for ids in prompts:
            check_context(engine, ids, max_tokens, request.prompt_param, request.max_tokens_param)
        params = choice_params(engine, request, max_tokens)
        yield Admitted(lease, prompts, params, leased_at)


def logit_bias(engine: Engine, requested: dict[str, float] | None) -> tuple[tuple[int, float], ...] | None:
    """`logit_bias` as (token id, bias) pairs; a 400 for a key that is not a token id."""
    if not requested:
        return None
    vocab = engine.info.vocab_size
    pairs = []
    for key, bias in requested.items():
        if not (key.isdigit() and int(key) < vocab):
            raise invalid(f"Invalid key in 'logit_bias': {key!r} is not a token id of this model (0 to {vocab - 1}).",
                          param="logit_bias", code="invalid_value")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def choice_params(engine: Engine, request: GenerationRequest, max_tokens: int) -> list[SamplingParams]:
    """One SamplingParams per choice: the request's options over the model's defaults. With
    a seed, choice i uses seed + i, so the choices differ from each other yet the whole
    response is reproducible."""
    bias = logit_bias(engine, request.logit_bias)
    if request.constraint is not None:
        try:
            engine.grammar()
        except GrammarError as exc:
            raise invalid(f"This model cannot constrain its output: {exc}", code="unsupported_parameter") from None
    seed = request.sampling.get("seed")
    try:
        return [engine.params(**{**request.sampling, "seed": None if seed is None else seed + i},
                              max_tokens=max_tokens, logprobs=request.logprobs, logit_bias=bias,
                              constraint=request.constraint)
                for i in range(request.n)]
    except (TypeError, ValueError) as exc:
        raise invalid(f"Invalid sampling parameters: {exc}") from None


def check_token_ids(engine: Engine, ids: list[int], param: str) -> None:
    """400 naming `param` for the first id that is not a token of this model."""
    vocab = engine.info.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"Invalid token id {bad} in '{param}' (the vocabulary has {vocab} tokens).", param=param)


def check_context(engine: Engine, prompt_ids: list[int], max_tokens: int, param: str,
                  max_tokens_param: str = "max_tokens") -> None:
    """400 naming `max_tokens_param` when it alone does not fit the context, else `param`
    (the prompt) when both together do not."""
    if max_tokens >= engine.context_length:
        raise APIError(400, f"'{max_tokens_param}' is {max_tokens}, but this model's context holds "
                       f"{engine.context_length} tokens in all (prompt and completion).", param=max_tokens_param,
                       code="context_length_exceeded")
    try:
        engine.check_length(prompt_ids, max_tokens)
    except ContextLengthError as exc:
        if not prompt_ids:
            raise invalid(f"'{param}' must not be empty.", param=param) from None
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None


def context_room(engine: Engine, prompt_ids: list[int]) -> int:
    """The tokens a reply may have after `prompt_ids` before the context is full."""
    return max(1, engine.context_length - len(prompt_ids))


def default_max_tokens(engine: Engine, prompt_ids: list[int]) -> int:
    """A request that sets no limit gets the model's `max_tokens` default (models.yaml), so a
    small model's loop ends in seconds; cut to what the context has left, as a limit rather
    than an error. Without a default, the rest of the context (as OpenAI's chat API)."""
    room = context_room(engine, prompt_ids)
    return min(engine.defaults.get("max_tokens", room), room)


async def until_done(request: Request, work: Awaitable[T], lease: Lease) -> T:
    """The result of `work`, unless the client goes away first (the work is cancelled, so
    its generations stop and free their memory) or the request's deadline passes (503)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=lease.remaining(), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if gone in done and task not in done:
        raise APIError(499, "The client closed the request.", code="client_closed_request")
    if task in done:
        try:
            return task.result()
        except asyncio.TimeoutError:  # the work's own wait for the same deadline ended first
            pass
    raise timed_out(lease.settings.retry_after)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
