"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from elmd.engine.engine import Chunk, Engine
from elmd.engine.protocol import TokenLogprob
from elmd.server import generation
from elmd.server.deps import get_manager
from elmd.server.errors import invalid, unsupported
from elmd.server.manager import ModelManager
from elmd.server.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatDelta, ChatMessage, ChoiceLogprobs, TokenLogprobInfo,
                                 TopLogprob)
from elmd.server.streaming import merge, sse_response

router = APIRouter()

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template takes them: known roles, text content only."""
    out = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            if message.role in ("tool", "function"):
                raise unsupported(f"messages[{i}].role")
            raise invalid(f"Invalid value for 'messages[{i}].role': {message.role!r}.", param=f"messages[{i}].role")
        if message.tool_calls or message.function_call:
            raise unsupported(f"messages[{i}].tool_calls" if message.tool_calls else f"messages[{i}].function_call")
        out.append({"role": ROLES[message.role], "content": _text(message, i)})
    return out


def _text(message: ChatMessage, i: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise invalid(f"Missing required parameter: 'messages[{i}].content'.", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise unsupported(f"messages[{i}].content[{j}].type")
        if part.text is None:
            raise invalid(f"Missing required parameter: 'messages[{i}].content[{j}].text'.",
                          param=f"messages[{i}].content[{j}].text")
        texts.append(part.text)
    return "\n".join(texts)


def token_logprobs(engine: Engine, logprobs: list[TokenLogprob], top: int) -> list[TokenLogprobInfo]:
    tokenizer = engine.tokenizer

    def entry(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.token_text(token_id), logprob=logprob, bytes=list(tokenizer.token_bytes(token_id)))

    infos = []
    for lp in logprobs:
        chosen = entry(lp.token_id, lp.logprob)
        infos.append(TokenLogprobInfo(**chosen.model_dump(), top_logprobs=[entry(t, l) for t, l in lp.top[:top]]))
    return infos


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, manager: ModelManager = Depends(get_manager)):
    generation.reject_unsupported(body)
    messages = template_messages(body.messages)
    lease = await manager.lease(body.model, body.keep_alive_seconds())
    try:
        engine = lease.engine
        prompt_ids = engine.tokenizer.encode_chat(messages)
        max_tokens = body.requested_max_tokens() or generation.default_max_tokens(engine, prompt_ids)
        generation.check_context(engine, prompt_ids, max_tokens, "messages")
        top = body.top_logprobs or 0
        params = generation.choice_params(engine, body, max_tokens, top if body.logprobs else None)
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                    system_fingerprint=f"elmd-{engine.backend.info.name}")
        if body.stream:
            streams = [engine.astream(prompt_ids, p, reply=True) for p in params]
            events = _stream(engine, streams, meta, body, len(prompt_ids), top, lease.deadline)
            return sse_response(events, lease, manager.settings.sse_ping_seconds)
    except BaseException:
        lease.release()
        raise
    try:
        work = asyncio.gather(*(engine.agenerate(prompt_ids, p, reply=True) for p in params))
        results = await generation.until_done(request, work, lease, manager.settings.retry_after)
    finally:
        lease.release()
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            logprobs=ChoiceLogprobs(content=token_logprobs(engine, r.logprobs, top)) if body.logprobs else None,
            finish_reason=r.finish_reason,
        )
        for i, r in enumerate(results)
    ]
    usage = generation.usage(len(prompt_ids), sum(r.usage.completion_tokens for r in results),
                             max(r.usage.cached_tokens for r in results))
    return ChatCompletion(**meta, choices=choices, usage=usage)


async def _stream(engine: Engine, streams: list[AsyncIterator[Chunk]], meta: dict, body: ChatCompletionRequest,
                  prompt_tokens: int, top: int, deadline: float) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**meta, choices=choices, usage=usage)

    for i in range(len(streams)):
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
    completion_tokens, cached = 0, 0
    async for i, piece in merge(streams, deadline):
        if piece.text or piece.logprobs:
            logprobs = ChoiceLogprobs(content=token_logprobs(engine, piece.logprobs, top)) if body.logprobs else None
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=piece.text), logprobs=logprobs)])
        if piece.finish_reason is not None:
            if piece.usage is not None:
                completion_tokens += piece.usage.completion_tokens
                cached = max(cached, piece.usage.cached_tokens)
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=piece.finish_reason)])
    if body.include_usage():
        yield chunk([], generation.usage(prompt_tokens, completion_tokens, cached))
