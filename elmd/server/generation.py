"""What chat and completions share: a request's sampling parameters for each of its `n`
choices, the context-length check, usage totals, and waiting for a non-streamed result
while watching the deadline and the client."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Protocol, TypeVar

from starlette.requests import Request

from elmd.engine.engine import ContextLengthError, Engine
from elmd.engine.grammar import GrammarError
from elmd.engine.protocol import Constraint, SamplingParams
from elmd.server.errors import APIError, invalid, timed_out, unsupported
from elmd.server.manager import Lease
from elmd.server.schemas import PromptTokensDetails, Usage, _Generation

T = TypeVar("T")


def reject_unsupported(body: _Generation) -> None:
    """400 for a parameter nobody defined (OpenAI's wording), a feature elmd does not
    implement or a contradictory combination, by name."""
    for name in body.unrecognized_params():
        raise invalid(f"Unrecognized request argument supplied: {name}", param=name)
    names = body.unsupported_params()
    if names:
        raise unsupported(names[0])
    for param, message in body.invalid_params():
        raise invalid(message, param=param)


class SamplingRequest(Protocol):
    """What `choice_params` reads from a request: chat and completions bodies, a Responses
    request and Ollama's options all have these fields."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    ignore_eos: bool | None
    stop: tuple[str, ...] | None
    n: int


def logit_bias(engine: Engine, body: SamplingRequest) -> tuple[tuple[int, float], ...] | None:
    """`logit_bias` as (token id, bias) pairs; a 400 for a key that is not a token id."""
    requested = getattr(body, "logit_bias", None)  # chat and completions have it
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


def choice_params(engine: Engine, body: SamplingRequest, max_tokens: int, logprobs: int | None,
                  constraint: Constraint | None = None) -> list[SamplingParams]:
    """One SamplingParams per choice. With a seed, choice i uses seed + i, so the choices
    differ from each other yet the whole response is reproducible."""
    bias = logit_bias(engine, body)
    if constraint is not None:
        try:
            engine.grammar()
        except GrammarError as exc:
            raise invalid(f"This model cannot constrain its output: {exc}", code="unsupported_parameter") from None
    try:
        return [
            engine.params(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                seed=None if body.seed is None else body.seed + i,
                stop=body.stop or None,
                logprobs=logprobs,
                ignore_eos=body.ignore_eos,
                logit_bias=bias,
                constraint=constraint,
            )
            for i in range(body.n)
        ]
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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


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
    if task in done:
        return task.result()
    if gone in done:
        raise APIError(499, "The client closed the request.", code="client_closed_request")
    raise timed_out(lease.settings.retry_after)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
