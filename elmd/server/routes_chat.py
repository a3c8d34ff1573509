"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from elmd.engine.engine import Chunk, Engine
from elmd.engine.protocol import TokenLogprob
from elmd.server import errors, generation, tools
from elmd.server.deps import get_manager
from elmd.server.errors import invalid, unsupported
from elmd.server.manager import ModelManager
from elmd.server.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatDelta, ChatMessage, ChoiceLogprobs, FunctionCallDelta,
                                 NamedToolChoice, ROLES, TextPart, TokenLogprobInfo, ToolCallDelta, TopLogprob)
from elmd.server.streaming import merge, sse_response, streamed
from elmd.server.structured import request_constraint

router = APIRouter()



def tool_use(body: ChatCompletionRequest) -> tools.ToolUse:
    choice = body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    return tools.ToolUse([t.function for t in body.tools or []], "auto" if named or choice is None else choice, named,
                         body.parallel_tool_calls is True)


def template_messages(messages: list[ChatMessage], use: tools.ToolUse | None = None) -> list[dict]:
    """Messages as the chat template takes them: known roles, text content only; tool
    calls, tool results and the request's tools in the generic format (elmd/server/tools.py)."""
    out = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for the results
    with_tools = use is not None and use.active
    for i, message in enumerate(messages):
        if message.function_call:  # on a tool result too: ignoring it would hide it
            raise unsupported(f"messages[{i}].function_call")
        if message.role == "tool":
            if message.tool_call_id is None:
                raise invalid(f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                              param=f"messages[{i}].tool_call_id")
            result = tools.render_result(message.tool_call_id, names.get(message.tool_call_id, ""), _text(message, i))
            out.append({"role": "user", "content": result})
            continue
        if message.role not in ROLES:
            if message.role == "function":
                raise unsupported(f"messages[{i}].role")
            raise invalid(f"Invalid value for 'messages[{i}].role': {message.role!r}.", param=f"messages[{i}].role")
        if message.tool_calls:
            names.update((call.id, call.function.name) for call in message.tool_calls)
            content = tools.render_calls([(c.function.name, c.function.arguments) for c in message.tool_calls])
        elif message.role == "assistant" and with_tools:
            content = tools.render_answer(_text(message, i))
        else:
            content = _text(message, i)
        out.append({"role": ROLES[message.role], "content": content})
    return tools.with_system_prompt(out, use) if with_tools else out


def _text(message: ChatMessage, i: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise invalid(f"Missing required parameter: 'messages[{i}].content'.", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    return joined_text(content, f"messages[{i}].content")


def joined_text(parts: list[TextPart], param: str, types: tuple[str, ...] = ("text",)) -> str:
    """The text of content parts, one per line; 400 naming any part of another kind."""
    texts = []
    for j, part in enumerate(parts):
        if part.type not in types:
            raise unsupported(f"{param}[{j}].type")
        if part.text is None:
            raise invalid(f"Missing required parameter: '{param}[{j}].text'.", param=f"{param}[{j}].text")
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


@router.post("/v1/chat/completions", response_model=None,
             responses={**streamed(ChatCompletion, ChatCompletionChunk), **errors.responses(*errors.GENERATION)})
async def chat_completions(body: ChatCompletionRequest, request: Request, manager: ModelManager = Depends(get_manager)):
    generation.reject_unsupported(body)
    use = tool_use(body)
    constraint = tools.tool_constraint(use) if use.active else request_constraint(body)
    messages = template_messages(body.messages, use)
    async with await manager.lease(body.model, body.keep_alive_seconds()) as lease:
        engine = lease.engine
        prompt_ids = engine.tokenizer.encode_chat(messages)
        max_tokens = body.requested_max_tokens() or generation.default_max_tokens(engine, prompt_ids)
        generation.check_context(engine, prompt_ids, max_tokens, "messages")
        top = body.top_logprobs or 0
        params = generation.choice_params(engine, body, max_tokens, top if body.logprobs else None, constraint)
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                    system_fingerprint=engine.info.system_fingerprint)
        if body.stream:
            streams = [engine.astream(prompt_ids, p, reply=True) for p in params]
            if use.active:
                events = _stream_tool_calls(streams, meta, body, use, len(prompt_ids), lease.deadline)
            else:
                events = _stream(engine, streams, meta, body, len(prompt_ids), top, lease.deadline)
            return sse_response(events, lease)
        work = asyncio.gather(*(engine.agenerate(prompt_ids, p, reply=True) for p in params))
        results = await generation.until_done(request, work, lease)
    choices = []
    for i, r in enumerate(results):
        reply = tools.parse_reply(r.text, r.finish_reason) if use.active else tools.ToolReply(r.text, None, r.finish_reason)
        choices.append(ChatChoice(
            index=i,
            message=AssistantMessage(content=reply.content, tool_calls=reply.tool_calls),
            logprobs=ChoiceLogprobs(content=token_logprobs(engine, r.logprobs, top)) if body.logprobs else None,
            finish_reason=reply.finish_reason,
        ))
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
        yield ChatCompletionChunk(**meta, choices=[], usage=generation.usage(prompt_tokens, completion_tokens, cached))
