"""OpenAI's Responses API: POST /v1/responses (plain and streamed as typed events),
GET and DELETE /v1/responses/{id}, and conversations continued by `previous_response_id`.

The same engine, sampling and streaming plumbing as /v1/chat/completions; only the shapes
differ. A response is one assistant message with one `output_text` part."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from itertools import count
from typing import AsyncIterator, Iterator

from fastapi import APIRouter, Depends, Request

from elmd.engine.engine import Chunk, Engine
from elmd.engine.protocol import SamplingParams, TokenLogprob
from elmd.server import generation, structured
from elmd.server.deps import get_manager
from elmd.server.errors import APIError, invalid, unsupported
from elmd.server.manager import ModelManager
from elmd.server.response_store import ResponseStore
from elmd.server.routes_chat import ROLES, joined_text, token_logprobs
from elmd.server.schemas import TokenLogprobInfo
from elmd.server.schemas_responses import (DeletedResponse, IncompleteDetails, InputItem, InputTokensDetails,
                                           OutputMessage, OutputText, ResponseErrorEvent, ResponseEvent,
                                           ResponseObject, ResponsesRequest, ResponseText, ResponseUsage)
from elmd.server.streaming import merge, sse_response

router = APIRouter()

TEXT_PARTS = ("input_text", "output_text")  # an earlier answer sent back holds output_text


def get_store(request: Request) -> ResponseStore:
    return request.app.state.responses


def input_messages(items: str | list[InputItem]) -> list[dict]:
    """The request's input as chat-template messages: known roles, text parts only."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages = []
    for i, item in enumerate(items):
        if item.type != "message":
            raise unsupported(f"input[{i}].type")
        if item.role not in ROLES:
            raise invalid(f"Invalid value for 'input[{i}].role': {item.role!r}.", param=f"input[{i}].role")
        messages.append({"role": ROLES[item.role], "content": _text(item, i)})
    return messages


def _text(item: InputItem, i: int) -> str:
    if item.content is None:
        raise invalid(f"Missing required parameter: 'input[{i}].content'.", param=f"input[{i}].content")
    if isinstance(item.content, str):
        return item.content
    return joined_text(item.content, f"input[{i}].content", TEXT_PARTS)


@dataclass
class _Draft:
    """A response being made: what it answers and the ids its objects carry."""

    body: ResponsesRequest
    params: SamplingParams
    prompt_tokens: int
    engine: Engine
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def message(self, text: str, status: str, logprobs: list[TokenLogprob] = ()) -> OutputMessage:
        return OutputMessage(id=self.message_id, status=status,
                             content=[OutputText(text=text, logprobs=self.logprobs(logprobs))])

    def logprobs(self, logprobs: list[TokenLogprob]) -> list[TokenLogprobInfo]:
        """As chat reports them (token, logprob, bytes, top_logprobs), when asked for."""
        top = self.body.logprobs()
        return [] if top is None else token_logprobs(self.engine, logprobs, top)

    def response(self, output: list[OutputMessage], status: str = "in_progress", finish_reason: str | None = None,
                 completion_tokens: int = 0, cached_tokens: int = 0) -> ResponseObject:
        done = status != "in_progress"
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            completed_at=int(time.time()) if done else None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if finish_reason == "length" else None,
            instructions=self.body.instructions,
            max_output_tokens=self.body.max_output_tokens,
            top_logprobs=self.body.top_logprobs,
            model=self.body.model,
            output=output,
            previous_response_id=self.body.previous_response_id,
            store=self.body.store,
            temperature=self.params.temperature,
            top_p=self.params.top_p,
            tool_choice=self.body.tool_choice or "auto",
            parallel_tool_calls=self.body.parallel_tool_calls is not False,
            usage=ResponseUsage(
                input_tokens=self.prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
                output_tokens=completion_tokens,
                total_tokens=self.prompt_tokens + completion_tokens,
            ) if done else None,
            metadata=self.body.metadata or {},
            text=ResponseText(format=self.body.text.format) if self.body.text and self.body.text.format else ResponseText(),
        )

    def finished(self, text: str, logprobs: list[TokenLogprob], finish_reason: str, completion_tokens: int,
                 cached_tokens: int) -> ResponseObject:
        status = "incomplete" if finish_reason == "length" else "completed"
        return self.response([self.message(text, status, logprobs)], status, finish_reason, completion_tokens,
                             cached_tokens)


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request, manager: ModelManager = Depends(get_manager),
                          store: ResponseStore = Depends(get_store)):
    generation.reject_unsupported(body)
    history: list[dict] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = list(previous.conversation)
    conversation = history + input_messages(body.input)
    if not conversation:
        raise invalid("'input' must not be empty.", param="input")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    lease = await manager.lease(body.model, body.keep_alive_seconds())
    try:
        engine = lease.engine
        prompt_ids = engine.tokenizer.encode_chat(system + conversation)
        max_tokens = body.max_output_tokens or generation.default_max_tokens(engine, prompt_ids)
        generation.check_context(engine, prompt_ids, max_tokens, "input", max_tokens_param="max_output_tokens")
        constraint = structured.text_format_constraint(body.text.format if body.text else None)
        [params] = generation.choice_params(engine, body, max_tokens, body.logprobs(), constraint)
        draft = _Draft(body, params, len(prompt_ids), engine)
        if body.stream:
            sequence = count()
            chunks = engine.astream(prompt_ids, params, reply=True)
            events = _stream(draft, chunks, sequence, lease.deadline, store, conversation)
            return sse_response(events, lease, manager.settings.sse_ping_seconds, named=True, done=False,
                                error=lambda exc: _error_event(exc, next(sequence)))
    except BaseException:
        lease.release()
        raise
    try:
        result = await generation.until_done(request, engine.agenerate(prompt_ids, params, reply=True), lease,
                                             manager.settings.retry_after)
    finally:
        lease.release()
    response = draft.finished(result.text, result.logprobs, result.finish_reason, result.usage.completion_tokens,
                              result.usage.cached_tokens)
    _keep(store, response, conversation, result.text)
    return response


def _keep(store: ResponseStore, response: ResponseObject, conversation: list[dict], text: str) -> None:
    if response.store:
        store.put(response, conversation + [{"role": "assistant", "content": text}])


async def _stream(draft: _Draft, chunks: AsyncIterator[Chunk], sequence: Iterator[int], deadline: float,
                  store: ResponseStore, conversation: list[dict]) -> AsyncIterator[ResponseEvent]:
    """The events OpenAI sends for one text message, in its order."""
    item = dict(item_id=draft.message_id, output_index=0)

    def event(type: str, **fields) -> ResponseEvent:
        return ResponseEvent(type=type, sequence_number=next(sequence), **fields)

    yield event("response.created", response=draft.response([]))
    yield event("response.in_progress", response=draft.response([]))
    yield event("response.output_item.added", output_index=0, item=draft.message("", "in_progress").model_copy(
        update={"content": []}))
    yield event("response.content_part.added", **item, content_index=0, part=OutputText(text=""))
    text, logprobs, last = [], [], None
    async for _, chunk in merge([chunks], deadline):  # the deadline, as in chat
        if chunk.text or chunk.logprobs:
            text.append(chunk.text)
            logprobs += chunk.logprobs
            yield event("response.output_text.delta", **item, content_index=0, delta=chunk.text,
                        logprobs=draft.logprobs(chunk.logprobs))
        last = chunk
    full = "".join(text)
    response = draft.finished(full, logprobs, last.finish_reason, last.usage.completion_tokens,
                              last.usage.cached_tokens)
    message = response.output[0]
    yield event("response.output_text.done", **item, content_index=0, text=full, logprobs=message.content[0].logprobs)
    yield event("response.content_part.done", **item, content_index=0, part=message.content[0])
    yield event("response.output_item.done", output_index=0, item=message)
    _keep(store, response, conversation, full)
    kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
    yield event(kind, response=response)


def _error_event(exc: APIError, sequence_number: int) -> ResponseErrorEvent:
    return ResponseErrorEvent(code=exc.code, message=exc.message, param=exc.param, sequence_number=sequence_number)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def get_response(response_id: str, store: ResponseStore = Depends(get_store)) -> ResponseObject:
    return _stored(store, response_id).response


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, store: ResponseStore = Depends(get_store)) -> DeletedResponse:
    _stored(store, response_id)
    store.delete(response_id)
    return DeletedResponse(id=response_id)


def _stored(store: ResponseStore, response_id: str):
    stored = store.get(response_id)
    if stored is None:
        raise APIError(404, f"No response with id '{response_id}' is stored (responses made with `store: false` "
                       "are not kept, and a restart forgets them all).", param="response_id", code="not_found")
    return stored
