"""Anthropic's Messages API: POST /v1/messages (plain, or streamed as Anthropic's typed
events) and POST /v1/messages/count_tokens, so that apps built on Anthropic's SDKs run on
a local model. The same pipeline, sampling and tool engine as /v1/chat/completions; only
the shapes differ. Errors take Anthropic's shape on these routes (elmd/server/errors.py)."""

from __future__ import annotations

import json
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from elmd.engine.engine import Chunk
from elmd.server import errors, pipeline, tools
from elmd.server.anthropic.conversation import template_messages, tool_use
from elmd.server.anthropic.schemas import (CountTokensRequest, CountTokensResponse, MessageObject, MessagesRequest,
                                           StreamEvent, TextBlock, ToolUseBlock, Usage)
from elmd.server.deps import get_manager
from elmd.server.errors import APIError
from elmd.server.manager import ModelManager
from elmd.server.streaming import merge, sse_response, streamed

router = APIRouter()


def stop_reason(reply: tools.ToolReply, stop_sequence: str | None) -> str:
    if reply.tool_calls is not None:
        return "tool_use"
    if reply.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def content_blocks(reply: tools.ToolReply) -> list[TextBlock | ToolUseBlock]:
    """The reply as content blocks: its text, or one `tool_use` block per call."""
    if reply.tool_calls is None:
        return [TextBlock(text=reply.content or "")]
    return [ToolUseBlock(id=_tool_use_id(call.id), name=call.function.name, input=json.loads(call.function.arguments))
            for call in reply.tool_calls]


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> Usage:
    """Anthropic counts the prompt tokens read from the cache apart from the others."""
    return Usage(input_tokens=prompt_tokens - cached_tokens, output_tokens=output_tokens,
                 cache_read_input_tokens=cached_tokens)


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


@router.post("/v1/messages", response_model=None,
             responses={**streamed(MessageObject, StreamEvent), **errors.anthropic_responses(*errors.GENERATION)})
async def create_message(body: MessagesRequest, request: Request, manager: ModelManager = Depends(get_manager)):
    pipeline.reject_unsupported(body)
    use = tool_use(body)
    constraint = tools.reply_constraint(use, body)
    messages = template_messages(body, use)
    generation = pipeline.GenerationRequest(
        model=body.model, keep_alive=body.keep_alive_seconds(),
        encode=lambda engine: [engine.tokenizer.encode_chat(messages)], prompt_param="messages",
        sampling=body.sampling_values(), max_tokens=body.max_tokens, constraint=constraint)
    async with pipeline.admit(manager, generation) as admitted:
        engine = admitted.engine
        [prompt_ids], [params] = admitted.prompts, admitted.params
        message_id = f"msg_{uuid.uuid4().hex}"
        if body.stream:
            chunks = engine.astream(prompt_ids, params, reply=True)
            events = _stream(chunks, message_id, body.model, use, len(prompt_ids), admitted.lease.deadline)
            return sse_response(events, admitted.lease, named=True, done=False, error=APIError.anthropic_body)
        result = await admitted.wait(request, engine.agenerate(prompt_ids, params, reply=True))
    reply = tools.parse_reply(result.text, result.finish_reason) if use.active else \
        tools.ToolReply(result.text, None, result.finish_reason)
    return MessageObject(id=message_id, model=body.model, content=content_blocks(reply),
                         stop_reason=stop_reason(reply, result.stop_sequence),
                         stop_sequence=result.stop_sequence if reply.tool_calls is None else None,
                         usage=usage(len(prompt_ids), result.usage.completion_tokens, result.usage.cached_tokens))


async def _stream(chunks: AsyncIterator[Chunk], message_id: str, model: str, use: tools.ToolUse, prompt_tokens: int,
                  deadline: float) -> AsyncIterator[dict]:
    """Anthropic's events in its order: the message, then each content block (start, deltas,
    stop), then the stop reason with the usage, then the end. An answer streams as it is
    written; tool calls once their JSON is complete."""
    start = MessageObject(id=message_id, model=model, content=[], usage=usage(prompt_tokens, 0, 0))
    yield {"type": "message_start", "message": start.model_dump()}
    yield {"type": "ping"}
    reply = tools.ReplyStream(use)
    opened = False
    last = None
    async for _, chunk in merge([chunks], deadline):
        text = reply.add(chunk.text)
        if reply.answering and not opened:
            opened = True
            yield {"type": "content_block_start", "index": 0, "content_block": TextBlock(text="").model_dump()}
        if text:
            yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        last = chunk
    done, rest = reply.finish(last.finish_reason)
    if done.tool_calls is None:
        if not opened:
            yield {"type": "content_block_start", "index": 0, "content_block": TextBlock(text="").model_dump()}
        if rest:
            yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": rest}}
        yield {"type": "content_block_stop", "index": 0}
    for index, block in enumerate(content_blocks(done) if done.tool_calls is not None else []):
        yield {"type": "content_block_start", "index": index, "content_block": {**block.model_dump(), "input": {}}}
        yield {"type": "content_block_delta", "index": index,
               "delta": {"type": "input_json_delta", "partial_json": json.dumps(block.input, ensure_ascii=False)}}
        yield {"type": "content_block_stop", "index": index}
    stop_sequence = last.stop_sequence if done.tool_calls is None else None
    final = usage(prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens)
    yield {"type": "message_delta", "delta": {"stop_reason": stop_reason(done, last.stop_sequence),
                                              "stop_sequence": stop_sequence},
           "usage": {"output_tokens": final.output_tokens, "input_tokens": final.input_tokens,
                     "cache_read_input_tokens": final.cache_read_input_tokens}}
    yield {"type": "message_stop"}


@router.post("/v1/messages/count_tokens", response_model=CountTokensResponse,
             responses=errors.anthropic_responses(400, 404, 429, 503))
async def count_tokens(body: CountTokensRequest, manager: ModelManager = Depends(get_manager)) -> CountTokensResponse:
    """The prompt's tokens as this model reads them (its tools' description included)."""
    pipeline.reject_unsupported(body)
    use = tool_use(body)
    messages = template_messages(body, use)
    async with await manager.lease(body.model, body.keep_alive_seconds()) as lease:
        return CountTokensResponse(input_tokens=len(lease.engine.tokenizer.encode_chat(messages)))
