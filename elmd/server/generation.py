"""What chat and completions share: a request's sampling parameters for each of its `n`
choices, the context-length check, and usage totals."""

from __future__ import annotations

from elmd.engine.engine import ContextLengthError, Engine
from elmd.engine.protocol import SamplingParams
from elmd.server.errors import APIError, invalid, unsupported
from elmd.server.schemas import PromptTokensDetails, Usage, _Generation


def reject_unsupported(body: _Generation) -> None:
    names = body.unsupported_params()
    if names:
        raise unsupported(names[0])


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
