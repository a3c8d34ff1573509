"""POST /v1/completions: prompts as text or token ids, `echo`, and `logprobs` over the
prompt too, which is how lm-evaluation-harness scores log-likelihoods
(`echo: true, logprobs: 1, max_tokens: 0 or 1`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from elmd.engine.engine import Chunk, Engine
from elmd.engine.protocol import SamplingParams, TokenLogprob
from elmd.server import errors, pipeline
from elmd.server.deps import get_manager
from elmd.server.errors import invalid
from elmd.server.manager import ModelManager
from elmd.server.openai.schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage
from elmd.server.streaming import merge, sse_response, streamed

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # the legacy completions API's default


@dataclass
class _Prompt:
    ids: list[int]
    text: str  # what `echo` returns
    offsets: list[int]  # each prompt token's start in `text`
    scores: list[TokenLogprob | None] | None  # per prompt token (None for the first); with echo + logprobs


@dataclass
class _Piece:
    """Generated text with its tokens and where each token starts in the choice's text."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    offsets: list[int]


def _prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    pipeline.check_token_ids(engine, prompt, "prompt")
    return list(prompt)


def _offsets(engine: Engine, ids: list[int], start: int = 0) -> tuple[str, list[int]]:
    """Decoded text of `ids` and each token's start offset in it."""
    detok = engine.tokenizer.detokenizer()
    text, offsets = "", []
    for token_id in ids:
        offsets.append(start + len(text))
        text += detok.add(token_id)
    return text + detok.flush(), offsets


def _completion_logprobs(engine: Engine, ids: list[int], scores: list[TokenLogprob | None], offsets: list[int],
                         top: int) -> CompletionLogprobs:
    text = engine.tokenizer.token_text
    return CompletionLogprobs(
        tokens=[text(t) for t in ids],
        token_logprobs=[s.logprob if s else None for s in scores],
        top_logprobs=[{text(t): l for t, l in s.top[:top]} if s else None for s in scores],
        text_offset=offsets,
    )


async def _prepare(engine: Engine, body: CompletionRequest, prompt: str | list[int], ids: list[int]) -> _Prompt:
    decoded, offsets = _offsets(engine, ids)
    text = prompt if isinstance(prompt, str) else decoded
    scores = None
    if body.echo and body.logprobs is not None:
        scored = await asyncio.to_thread(engine.score, ids, body.logprobs)
        scores = [None, *scored]
    return _Prompt(ids, text, offsets, scores)


async def _generate(engine: Engine, prompt: _Prompt, params: SamplingParams, echo: bool) -> AsyncIterator[tuple[_Piece, Chunk | None]]:
    """The generated pieces of one choice; the last comes with the engine's final chunk."""
    if params.max_tokens == 0:
        return
    base = len(prompt.text) if echo else 0
    written = 0
    async for chunk in engine.astream(prompt.ids, params):
        offsets = [base + written] * len(chunk.token_ids)
        written += len(chunk.text)
        yield _Piece(chunk.text, chunk.token_ids, chunk.logprobs, offsets), chunk


def _choice(engine: Engine, index: int, text: str, ids: list[int], scores: list, offsets: list[int],
            body: CompletionRequest, finish_reason: str | None) -> CompletionChoice:
    logprobs = None
    if body.logprobs is not None:
        logprobs = _completion_logprobs(engine, ids, scores, offsets, body.logprobs)
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)


def _echoed(prompt: _Prompt, body: CompletionRequest) -> tuple[str, list[int], list, list[int]]:
    if not body.echo:
        return "", [], [], []
    scores = list(prompt.scores) if prompt.scores is not None else [None] * len(prompt.ids)
    return prompt.text, list(prompt.ids), scores, list(prompt.offsets)  # copies: each choice extends its own


@router.post("/v1/completions", response_model=None,
             responses={**streamed(Completion, Completion), **errors.responses(*errors.GENERATION)})
async def completions(body: CompletionRequest, request: Request, manager: ModelManager = Depends(get_manager)):
    pipeline.reject_unsupported(body)
    constraint = body.constraint()
    raw_prompts = body.prompts()
    if not raw_prompts:
        raise invalid("'prompt' must not be empty.", param="prompt")
    generation = pipeline.GenerationRequest(
        model=body.model, keep_alive=body.keep_alive_seconds(),
        encode=lambda engine: [_prompt_ids(engine, p) for p in raw_prompts], prompt_param="prompt",
        sampling=body.sampling_values(), max_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
        n=body.n, logprobs=body.logprobs, logit_bias=body.logit_bias, constraint=constraint)
    async with pipeline.admit(manager, generation) as admitted:
        engine = admitted.engine
        prompts = [await _prepare(engine, body, raw, ids) for raw, ids in zip(raw_prompts, admitted.prompts)]
        meta = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                    system_fingerprint=engine.system_fingerprint)
        jobs = [(k * body.n + i, prompt, p) for k, prompt in enumerate(prompts) for i, p in enumerate(admitted.params)]
        if body.stream:
            return sse_response(_stream(engine, body, meta, jobs, admitted.lease.deadline), admitted.lease)
        results = await admitted.wait(request, asyncio.gather(
            *(_collect(engine, prompt, p, body.echo) for _, prompt, p in jobs)))
    choices = []
    for (index, prompt, _), (pieces, last) in zip(jobs, results):
        text, ids, scores, offsets = _echoed(prompt, body)
        for piece in pieces:
            text += piece.text
            ids += piece.token_ids
            scores += piece.logprobs
            offsets += piece.offsets
        choices.append(_choice(engine, index, text, ids, scores, offsets, body, last.finish_reason if last else "length"))
    return Completion(**meta, choices=choices, usage=_usage(prompts, [last for _, last in results]))


async def _collect(engine: Engine, prompt: _Prompt, params: SamplingParams, echo: bool) -> tuple[list[_Piece], Chunk | None]:
    pieces, last = [], None
    async for piece, chunk in _generate(engine, prompt, params, echo):
        pieces.append(piece)
        last = chunk
    return pieces, last


def _usage(prompts: list[_Prompt], finals: list[Chunk | None]) -> Usage:
    completion_tokens = sum(c.usage.completion_tokens for c in finals if c is not None and c.usage)
    cached = sum(c.usage.cached_tokens for c in finals if c is not None and c.usage)
    return Usage.of(sum(len(p.ids) for p in prompts), completion_tokens, cached)


async def _stream(engine: Engine, body: CompletionRequest, meta: dict, jobs: list, deadline: float) -> AsyncIterator[Completion]:
    def event(index: int, text: str, ids: list[int], scores: list, offsets: list[int], finish: str | None) -> Completion:
        return Completion(**meta, choices=[_choice(engine, index, text, ids, scores, offsets, body, finish)])

    for index, prompt, _ in jobs:
        if body.echo:
            yield event(index, *_echoed(prompt, body), None)
    finals: list[Chunk | None] = [None] * len(jobs)
    streams = [_generate(engine, prompt, p, body.echo) for _, prompt, p in jobs]
    async for j, (piece, chunk) in merge(streams, deadline):
        index = jobs[j][0]
        if piece.text or piece.token_ids:
            yield event(index, piece.text, piece.token_ids, piece.logprobs, piece.offsets, None)
        if chunk.finish_reason is not None:
            finals[j] = chunk
            yield event(index, "", [], [], [], chunk.finish_reason)
    for j, (index, _, p) in enumerate(jobs):
        if p.max_tokens == 0:
            yield event(index, "", [], [], [], "length")
    if body.include_usage():
        prompts = list({id(prompt): prompt for _, prompt, _ in jobs}.values())
        yield Completion(**meta, choices=[], usage=_usage(prompts, finals))
