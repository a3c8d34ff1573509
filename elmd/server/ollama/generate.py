"""Ollama's generation endpoints: POST /api/chat and POST /api/generate, streamed as
newline-delimited JSON by default (`stream: false` for one object), `options` mapped to
the same sampling parameters as OpenAI's, `keep_alive` as on every route.

The same engine, sampling and streaming plumbing as /v1/chat/completions; only the shapes
differ. A request with no messages (or an empty prompt) loads the model, or with
`keep_alive: 0` unloads it, as Ollama's does."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from elmd.engine.engine import Chunk, Engine
from elmd.server import errors, pipeline, structured, tools
from elmd.server.deps import get_manager
from elmd.server.errors import APIError, invalid
from elmd.server.manager import ModelManager
from elmd.server.ollama.common import NS, model_id, timestamp
from elmd.server.wire import ROLES
from elmd.server.ollama.schemas import (OllamaChatMessage, OllamaChatRequest, OllamaChatResponse, OllamaFunctionCall,
                                        OllamaGenerateRequest, OllamaGenerateResponse, OllamaToolCall,
                                        _OllamaGeneration)
from elmd.server.streaming import NDJSON, merge, ndjson_response, streamed

router = APIRouter()

# Ollama's num_predict -1 (no limit) and -2 (fill the context): the client asks for the whole
# context, so the model's max_tokens default does not apply.
UNLIMITED = (-1, -2)


def max_tokens(num_predict: int | None) -> int | str | None:
    """`num_predict` in the pipeline's terms: unset or 0 (or below -2) take the model's default."""
    if num_predict in UNLIMITED:
        return pipeline.FILL_CONTEXT
    return num_predict if num_predict is not None and num_predict > 0 else None


@dataclass
class _Clock:
    """Ollama's counters for one request: load, prompt and generation times (ns)."""

    start: float = field(default_factory=time.monotonic)
    loaded: float = 0.0
    first_token: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def timings(self) -> dict:
        end = time.monotonic()
        first = self.first_token or end
        return dict(
            total_duration=int((end - self.start) * NS),
            load_duration=int((self.loaded - self.start) * NS),
            prompt_eval_count=self.prompt_tokens - self.cached_tokens,
            prompt_eval_duration=int((first - self.loaded) * NS),
            eval_count=self.completion_tokens,
            eval_duration=int((end - first) * NS),
        )


# A route's shape: (text, done, done_reason, timings) -> its response object.
Shape = Callable[..., BaseModel]


def no_images(param: str) -> APIError:
    return APIError(400, f"'{param}' is not supported: elmd's models read text only, not images.", param=param,
                    code="unsupported_parameter")


def tool_use(body: OllamaChatRequest) -> tools.ToolUse:
    """Ollama has no tool_choice: with tools, the model may answer or call (OpenAI's auto)."""
    return tools.ToolUse([t.function for t in body.tools or []])


def chat_messages(body: OllamaChatRequest, use: tools.ToolUse) -> list[dict]:
    """Messages as the chat template takes them: known roles, text only; tool calls, tool
    results and the request's tools in the generic format (elmd/server/tools.py)."""
    out = []
    called: list[str] = []  # the last calls' names, for results that do not name their tool
    for i, message in enumerate(body.messages):
        if message.images:
            raise no_images(f"messages[{i}].images")
        if message.role == "tool":
            name = message.tool_name or (called.pop(0) if called else "")
            out.append({"role": "user", "content": tools.render_result(message.tool_call_id, name, message.content)})
            continue
        if message.role not in ROLES:
            raise invalid(f"Invalid value for 'messages[{i}].role': {message.role!r}.", param=f"messages[{i}].role")
        if message.tool_calls:
            called = [call.function.name for call in message.tool_calls]
            content = tools.render_calls([(c.function.name, c.function.arguments) for c in message.tool_calls])
        elif message.role == "assistant" and use.active:
            content = tools.render_answer(message.content)
        else:
            content = message.content
        out.append({"role": ROLES[message.role], "content": content})
    return tools.with_system_prompt(out, use)


def ollama_calls(reply: tools.ToolReply) -> list[OllamaToolCall] | None:
    """OpenAI-framed calls as Ollama's message carries them: arguments as an object."""
    if reply.tool_calls is None:
        return None
    return [OllamaToolCall(id=call.id, function=OllamaFunctionCall(index=k, name=call.function.name,
                                                                   arguments=json.loads(call.function.arguments)))
            for k, call in enumerate(reply.tool_calls)]


@router.post("/api/chat", response_model=None, responses={**streamed(OllamaChatResponse, OllamaChatResponse, NDJSON),
                                                        **errors.ollama_responses(*errors.GENERATION)})
async def chat(body: OllamaChatRequest, request: Request, manager: ModelManager = Depends(get_manager)):
    pipeline.reject_unsupported(body)
    use = tool_use(body)
    messages = chat_messages(body, use)
    model = model_id(manager, body.model)

    def shape(text: str, done: bool, done_reason: str | None = None, tool_calls: list[OllamaToolCall] | None = None,
              **timings) -> OllamaChatResponse:
        return OllamaChatResponse(model=body.model, created_at=timestamp(),
                                  message=OllamaChatMessage(content=text, tool_calls=tool_calls), done=done,
                                  done_reason=done_reason, **timings)

    if not body.messages:
        return await _load_or_unload(manager, model, body, shape)
    return await _generate(request, manager, model, body, lambda engine: engine.tokenizer.encode_chat(messages),
                           "messages", shape, use)


@router.post("/api/generate", response_model=None,
             responses={**streamed(OllamaGenerateResponse, OllamaGenerateResponse, NDJSON),
                        **errors.ollama_responses(*errors.GENERATION)})
async def generate(body: OllamaGenerateRequest, request: Request, manager: ModelManager = Depends(get_manager)):
    pipeline.reject_unsupported(body)
    if body.images:
        raise no_images("images")
    model = model_id(manager, body.model)

    def shape(text: str, done: bool, done_reason: str | None = None, **timings) -> OllamaGenerateResponse:
        return OllamaGenerateResponse(model=body.model, created_at=timestamp(), response=text, done=done,
                                      done_reason=done_reason, **timings)

    def prompt_ids(engine: Engine) -> list[int]:
        if body.raw:
            return engine.tokenizer.encode(body.prompt)
        system = [{"role": "system", "content": body.system}] if body.system else []
        return engine.tokenizer.encode_chat(system + [{"role": "user", "content": body.prompt}])

    if not body.prompt:
        return await _load_or_unload(manager, model, body, shape)
    return await _generate(request, manager, model, body, prompt_ids, "prompt", shape)


async def _load_or_unload(manager: ModelManager, model: str, body: _OllamaGeneration, shape: Shape) -> BaseModel:
    manager.spec(model)  # 404 for an unknown model
    given, seconds = body.keep_alive_seconds()
    if given and seconds == 0:
        await manager.unload(model)
        return shape("", True, "unload")
    lease = await manager.lease(model, (given, seconds))
    lease.release()
    return shape("", True, "load")


async def _generate(request: Request, manager: ModelManager, model: str, body: _OllamaGeneration,
                    prompt_ids: Callable[[Engine], list[int]], param: str, shape: Shape,
                    use: tools.ToolUse | None = None):
    clock = _Clock()
    if use is not None and use.active:
        constraint = tools.tool_constraint(use)
    else:
        constraint = structured.ollama_format_constraint(body.format)
    options = body.sampling()
    generation = pipeline.GenerationRequest(
        model=model, keep_alive=body.keep_alive_seconds(), encode=lambda engine: [prompt_ids(engine)],
        prompt_param=param, sampling=options.sampling_values(), max_tokens=max_tokens(options.num_predict),
        max_tokens_param="options.num_predict", constraint=constraint)
    async with pipeline.admit(manager, generation) as admitted:
        clock.loaded = admitted.leased_at
        [ids], [params] = admitted.prompts, admitted.params
        clock.prompt_tokens = len(ids)
        chunks = admitted.engine.astream(ids, params, reply=True)
        if body.stream:
            return ndjson_response(_stream(chunks, clock, admitted.lease.deadline, shape, use), admitted.lease,
                                   error=APIError.ollama_body)
        text, reason = await admitted.wait(request, _collect(chunks, clock, admitted.lease.deadline))
    if use is None or not use.active:
        return shape(text, True, reason, **clock.timings())
    reply = tools.parse_reply(text, reason)
    return shape(reply.content or "", True, reason, ollama_calls(reply), **clock.timings())


async def _pieces(chunks: AsyncIterator[Chunk], clock: _Clock, deadline: float) -> AsyncIterator[Chunk]:
    """The generation's chunks within the request's deadline, timed for Ollama's counters."""
    async for _, chunk in merge([chunks], deadline):
        if not clock.first_token:
            clock.first_token = time.monotonic()
        if chunk.usage is not None:
            clock.completion_tokens, clock.cached_tokens = chunk.usage.completion_tokens, chunk.usage.cached_tokens
        yield chunk


async def _collect(chunks: AsyncIterator[Chunk], clock: _Clock, deadline: float) -> tuple[str, str]:
    text, reason = [], "stop"
    async for chunk in _pieces(chunks, clock, deadline):
        text.append(chunk.text)
        reason = chunk.finish_reason or reason
    return "".join(text), reason


async def _stream(chunks: AsyncIterator[Chunk], clock: _Clock, deadline: float, shape: Shape,
                  use: tools.ToolUse | None) -> AsyncIterator[BaseModel]:
    """One object per piece of text (under tools: the answer's, as it is written, or one
    object with the calls once complete), then the last (`done: true`) with the counters."""
    reason = "stop"
    reply = tools.ReplyStream(use)
    async for chunk in _pieces(chunks, clock, deadline):
        text = reply.add(chunk.text)
        if text:
            yield shape(text, False)
        reason = chunk.finish_reason or reason
    done, rest = reply.finish(reason)
    if rest:
        yield shape(rest, False)
    if done.tool_calls is not None:
        yield shape("", False, None, ollama_calls(done))
    yield shape("", True, reason, **clock.timings())
