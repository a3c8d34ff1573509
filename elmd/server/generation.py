"""What chat and completions share: a request's sampling parameters for each of its `n`
choices, the context-length check, usage totals, and waiting for a non-streamed result
while watching the deadline and the client."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import Request

from elmd.engine.engine import ContextLengthError, Engine
from elmd.engine.protocol import SamplingParams
from elmd.server.errors import APIError, invalid, timed_out, unsupported
from elmd.server.manager import Lease
from elmd.server.schemas import PromptTokensDetails, Usage, _Generation

T = TypeVar("T")


def reject_unsupported(body: _Generation) -> None:
    """400 for a feature elmd does not implement or a contradictory combination, by name."""
    names = body.unsupported_params()
    if names:
        raise unsupported(names[0])
    for param, message in body.invalid_params():
        raise invalid(message, param=param)


def choice_params(engine: Engine, body: _Generation, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
    """One SamplingParams per choice. With a seed, choice i uses seed + i, so the choices
    differ from each other yet the whole response is reproducible."""
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
                stop=body.stops() or None,
                logprobs=logprobs,
                ignore_eos=body.ignore_eos,
            )
            for i in range(body.n)
        ]
    except (TypeError, ValueError) as exc:
        raise invalid(f"Invalid sampling parameters: {exc}") from None


def check_context(engine: Engine, prompt_ids: list[int], max_tokens: int, param: str) -> None:
    """400 naming `max_tokens` when it alone does not fit the context, else `param` (the
    prompt) when both together do not."""
    if max_tokens >= engine.context_length:
        raise APIError(400, f"'max_tokens' is {max_tokens}, but this model's context holds {engine.context_length} "
                       "tokens in all (prompt and completion).", param="max_tokens", code="context_length_exceeded")
    try:
        engine.check_length(prompt_ids, max_tokens)
    except ContextLengthError as exc:
        if not prompt_ids:
            raise invalid(f"'{param}' must not be empty.", param=param) from None
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None


def default_max_tokens(engine: Engine, prompt_ids: list[int]) -> int:
    """Without max_tokens a reply may use the rest of the context (as OpenAI's chat API)."""
    return max(1, engine.context_length - len(prompt_ids))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


async def until_done(request: Request, work: Awaitable[T], lease: Lease, retry_after: int) -> T:
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
    raise timed_out(retry_after)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
