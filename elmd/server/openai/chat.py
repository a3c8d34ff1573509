"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from elmd.engine.engine import Chunk, Engine
from elmd.server import errors, pipeline, tools
from elmd.server.deps import get_manager
from elmd.server.manager import ModelManager
from elmd.server.openai.messages import template_messages, tool_use
from elmd.server.openai.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                        ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChoiceLogprobs,
                                        FunctionCallDelta, ToolCallDelta, Usage)
from elmd.server.streaming import merge, sse_response, streamed
from elmd.server.wire import token_logprobs

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None,
             responses={**streamed(ChatCompletion, ChatCompletionChunk), **errors.responses(*errors.GENERATION)})
async def chat_completions(body: ChatCompletionRequest, request: Request, manager: ModelManager = Depends(get_manager)):
    pipeline.reject_unsupported(body)
    use = tool_use(body)
    constraint = tools.reply_constraint(use, body)
    messages = template_messages(body.messages, use)
    top = body.top_logprobs or 0
    generation = pipeline.GenerationRequest(
        model=body.model, keep_alive=body.keep_alive_seconds(),
        encode=lambda engine: [engine.tokenizer.encode_chat(messages)], prompt_param="messages",
        sampling=body.sampling_values(), max_tokens=body.requested_max_tokens(), n=body.n,
        logprobs=top if body.logprobs else None, logit_bias=body.logit_bias,
        constraint=constraint)
    async with pipeline.admit(manager, generation) as admitted:
        engine = admitted.engine
        [prompt_ids] = admitted.prompts
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                    system_fingerprint=engine.system_fingerprint)
        if body.stream:
            streams = [engine.astream(prompt_ids, p, reply=True) for p in admitted.params]
            if use.active:
                events = _stream_tool_calls(streams, meta, body, use, len(prompt_ids), admitted.lease.deadline)
            else:
                events = _stream(engine, streams, meta, body, len(prompt_ids), top, admitted.lease.deadline)
            return sse_response(events, admitted.lease)
        results = await admitted.wait(request, asyncio.gather(
            *(engine.agenerate(prompt_ids, p, reply=True) for p in admitted.params)))
    choices = []
    for i, r in enumerate(results):
        reply = tools.parse_reply(r.text, r.finish_reason) if use.active else tools.ToolReply(r.text, None, r.finish_reason)
        choices.append(ChatChoice(
            index=i,
            message=AssistantMessage(content=reply.content, tool_calls=reply.tool_calls),
            logprobs=ChoiceLogprobs(content=token_logprobs(engine, r.logprobs, top)) if body.logprobs else None,
            finish_reason=reply.finish_reason,
        ))
    usage = Usage.of(len(prompt_ids), sum(r.usage.completion_tokens for r in results),
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
        yield chunk([], Usage.of(prompt_tokens, completion_tokens, cached))


async def _stream_tool_calls(streams: list[AsyncIterator[Chunk]], meta: dict, body: ChatCompletionRequest,
                             use: tools.ToolUse, prompt_tokens: int, deadline: float) -> AsyncIterator[ChatCompletionChunk]:
    """A reply under `tools`, framed as OpenAI streams it. An answer streams as content as
    it is written; calls are sent once their JSON is complete, as a first delta with the
    role and each call's id and name, then the arguments; then `finish_reason`."""
    def chunk(i: int, delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**meta, choices=[ChatChunkChoice(index=i, delta=delta, finish_reason=finish_reason)])

    replies = [tools.ReplyStream(use) for _ in streams]
    completion_tokens, cached = 0, 0
    async for i, piece in merge(streams, deadline):
        reply = replies[i]
        was_answering = reply.answering
        text = reply.add(piece.text)
        if reply.answering and not was_answering:
            yield chunk(i, ChatDelta(role="assistant", content=""))
        if text:
            yield chunk(i, ChatDelta(content=text))
        if piece.finish_reason is None:
            continue
        completion_tokens += piece.usage.completion_tokens
        cached = max(cached, piece.usage.cached_tokens)
        done, rest = reply.finish(piece.finish_reason)
        if done.tool_calls is None and not reply.answering:
            yield chunk(i, ChatDelta(role="assistant", content=""))
        if rest:
            yield chunk(i, ChatDelta(content=rest))
        for k, call in enumerate(done.tool_calls or []):
            header = ToolCallDelta(index=k, id=call.id, type="function",
                                   function=FunctionCallDelta(name=call.function.name, arguments=""))
            yield chunk(i, ChatDelta(role="assistant", tool_calls=[header]) if k == 0 else ChatDelta(tool_calls=[header]))
            arguments = ToolCallDelta(index=k, function=FunctionCallDelta(arguments=call.function.arguments))
            yield chunk(i, ChatDelta(tool_calls=[arguments]))
        yield chunk(i, ChatDelta(), done.finish_reason)
    if body.include_usage():
        yield ChatCompletionChunk(**meta, choices=[], usage=Usage.of(prompt_tokens, completion_tokens, cached))
