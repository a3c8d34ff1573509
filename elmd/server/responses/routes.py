"""OpenAI's Responses API: POST /v1/responses (plain and streamed as typed events),
GET and DELETE /v1/responses/{id}, and conversations continued by `previous_response_id`.

The same engine, sampling and streaming plumbing as /v1/chat/completions; only the shapes
differ. A response is one assistant message with one `output_text` part, or, under
`tools`, one `function_call` item per call (the tool format of elmd/server/tools.py)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from itertools import count
from typing import AsyncIterator, Iterator

from fastapi import APIRouter, Depends, Request

from elmd.engine.engine import Chunk, Engine
from elmd.engine.protocol import SamplingParams, TokenLogprob
from elmd.server import errors, pipeline, structured, tools
from elmd.server.deps import get_manager
from elmd.server.errors import APIError, invalid, unsupported
from elmd.server.manager import ModelManager
from elmd.server.responses.store import ResponseStore
from elmd.server.wire import ROLES, FunctionDefinition, TextPart, TokenLogprobInfo, joined_text, token_logprobs
from elmd.server.responses.schemas import (DeletedResponse, FunctionCallItem, IncompleteDetails, InputItem,
                                           InputTokensDetails, NamedFunctionChoice, OutputMessage, OutputText,
                                           ResponseErrorEvent, ResponseEvent, ResponseObject, ResponsesRequest,
                                           ResponseText, ResponseUsage, TEXT_PARTS)
from elmd.server.streaming import merge, sse_response, streamed

router = APIRouter()


def get_store(request: Request) -> ResponseStore:
    return request.app.state.responses


def tool_use(body: ResponsesRequest) -> tools.ToolUse:
    choice = body.tool_choice
    named = choice.name if isinstance(choice, NamedFunctionChoice) else None
    functions = [FunctionDefinition(name=t.name, description=t.description, parameters=t.parameters)
                 for t in body.tools or []]
    return tools.ToolUse(functions, "auto" if named or choice is None else choice, named,
                         body.parallel_tool_calls is True, parameters_param="tools[{}].parameters")


def input_messages(items: str | list[InputItem], use: tools.ToolUse, names: dict[str, str]) -> list[dict]:
    """The request's input as chat-template messages: known roles and text parts; function
    calls and their outputs in the generic tool format (elmd/server/tools.py). `names`
    (call_id -> function name) holds the calls of earlier turns and gains this input's."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    calls: list[tuple[str, str]] = []  # consecutive function_call items: one assistant turn

    def end_calls() -> None:
        if calls:
            messages.append({"role": "assistant", "content": tools.render_calls(calls)})
            calls.clear()

    for i, item in enumerate(items):
        if item.type == "function_call":
            for name in ("call_id", "name", "arguments"):
                _required(getattr(item, name), f"input[{i}].{name}")
            names[item.call_id] = item.name
            calls.append((item.name, item.arguments))
            continue
        end_calls()
        if item.type == "function_call_output":
            _required(item.call_id, f"input[{i}].call_id")
            output = _text(item.output, f"input[{i}].output")
            messages.append({"role": "user", "content": tools.render_result(item.call_id, names.get(item.call_id, ""),
                                                                            output)})
        elif item.type == "message":
            if item.role not in ROLES:
                raise invalid(f"Invalid value for 'input[{i}].role': {item.role!r}.", param=f"input[{i}].role")
            text = _text(item.content, f"input[{i}].content")
            answer = item.role == "assistant" and use.active
            messages.append({"role": ROLES[item.role], "content": tools.render_answer(text) if answer else text})
        else:
            raise unsupported(f"input[{i}].type")
    end_calls()
    return messages


def _required(value, param: str) -> None:
    if value is None:
        raise invalid(f"Missing required parameter: '{param}'.", param=param)


def _text(content: str | list[TextPart] | None, param: str) -> str:
    _required(content, param)
    return content if isinstance(content, str) else joined_text(content, param, TEXT_PARTS)


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

    def output(self, reply: tools.ToolReply, logprobs: list[TokenLogprob]) -> list[OutputMessage | FunctionCallItem]:
        """The output items of a finished reply: one message, or one item per function call."""
        if reply.tool_calls is None:
            return [self.message(reply.content, "incomplete" if reply.finish_reason == "length" else "completed",
                                 logprobs)]
        return [FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=call.id, name=call.function.name,
                                 arguments=call.function.arguments, status="completed") for call in reply.tool_calls]

    def response(self, output: list[OutputMessage | FunctionCallItem], status: str = "in_progress",
                 finish_reason: str | None = None, completion_tokens: int = 0,
                 cached_tokens: int = 0) -> ResponseObject:
        done = status != "in_progress"
        choice = self.body.tool_choice
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
            tool_choice=choice.model_dump(exclude_none=True) if isinstance(choice, NamedFunctionChoice) else choice or "auto",
            tools=[tool.echoed() for tool in self.body.tools or []],
            parallel_tool_calls=self.body.parallel_tool_calls is True,
            usage=ResponseUsage(
                input_tokens=self.prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
                output_tokens=completion_tokens,
                total_tokens=self.prompt_tokens + completion_tokens,
            ) if done else None,
            metadata=self.body.metadata or {},
            text=ResponseText(format=self.body.text.format) if self.body.text and self.body.text.format else ResponseText(),
        )

    def finished(self, output: list[OutputMessage | FunctionCallItem], finish_reason: str, completion_tokens: int,
                 cached_tokens: int) -> ResponseObject:
        status = "incomplete" if finish_reason == "length" else "completed"
        return self.response(output, status, finish_reason, completion_tokens, cached_tokens)


@router.post("/v1/responses", response_model=None,
             responses={**streamed(ResponseObject, ResponseEvent), **errors.responses(*errors.GENERATION)})
async def create_response(body: ResponsesRequest, request: Request, manager: ModelManager = Depends(get_manager),
                          store: ResponseStore = Depends(get_store)):
    pipeline.reject_unsupported(body)
    use = tool_use(body)
    history: list[dict] = []
    names: dict[str, str] = {}
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = list(previous.conversation)
        names = dict(previous.calls)
    conversation = history + input_messages(body.input, use, names)
    if not conversation:
        raise invalid("'input' must not be empty.", param="input")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if use.active:
        constraint = tools.tool_constraint(use)
    else:
        constraint = structured.text_format_constraint(body.text.format if body.text else None)
    messages = tools.with_system_prompt(system + conversation, use)
    generation = pipeline.GenerationRequest(
        model=body.model, keep_alive=body.keep_alive_seconds(),
        encode=lambda engine: [engine.tokenizer.encode_chat(messages)], prompt_param="input",
        sampling=body.sampling_values(), max_tokens=body.max_output_tokens, max_tokens_param="max_output_tokens",
        logprobs=body.logprobs(), constraint=constraint)
    async with pipeline.admit(manager, generation) as admitted:
        engine = admitted.engine
        [prompt_ids], [params] = admitted.prompts, admitted.params
        draft = _Draft(body, params, len(prompt_ids), engine)
        if body.stream:
            sequence = count()
            chunks = engine.astream(prompt_ids, params, reply=True)
            events = _stream(draft, use, chunks, sequence, admitted.lease.deadline, store, conversation)
            return sse_response(events, admitted.lease, named=True, done=False,
                                error=lambda exc: _error_event(exc, next(sequence)))
        result = await admitted.wait(request, engine.agenerate(prompt_ids, params, reply=True))
    reply = tools.parse_reply(result.text, result.finish_reason) if use.active else \
        tools.ToolReply(result.text, None, result.finish_reason)
    response = draft.finished(draft.output(reply, result.logprobs), result.finish_reason,
                              result.usage.completion_tokens, result.usage.cached_tokens)
    _keep(store, response, conversation, result.text)
    return response


def _keep(store: ResponseStore, response: ResponseObject, conversation: list[dict], text: str) -> None:
    """Keep the response with its conversation, the reply as the model wrote it."""
    if response.store:
        store.put(response, conversation + [{"role": "assistant", "content": text}])


async def _stream(draft: _Draft, use: tools.ToolUse, chunks: AsyncIterator[Chunk], sequence: Iterator[int],
                  deadline: float, store: ResponseStore, conversation: list[dict]) -> AsyncIterator[ResponseEvent]:
    """The events OpenAI sends for one text message or for function calls, in its order.
    An answer streams as it is written; function calls once their JSON is complete."""
    item = dict(item_id=draft.message_id, output_index=0)

    def event(type: str, **fields) -> ResponseEvent:
        return ResponseEvent(type=type, sequence_number=next(sequence), **fields)

    def opening() -> Iterator[ResponseEvent]:
        yield event("response.output_item.added", output_index=0, item=draft.message("", "in_progress").model_copy(
            update={"content": []}))
        yield event("response.content_part.added", **item, content_index=0, part=OutputText(text=""))

    yield event("response.created", response=draft.response([]))
    yield event("response.in_progress", response=draft.response([]))
    reply = tools.ReplyStream(use)
    opened = reply.answering
    if opened:
        for e in opening():
            yield e
    logprobs, last = [], None
    async for _, chunk in merge([chunks], deadline):  # the deadline, as in chat
        text = reply.add(chunk.text)
        if reply.answering and not opened:
            opened = True
            for e in opening():
                yield e
        if text or chunk.logprobs:
            logprobs += chunk.logprobs
            yield event("response.output_text.delta", **item, content_index=0, delta=text,
                        logprobs=draft.logprobs(chunk.logprobs))
        last = chunk
    done, rest = reply.finish(last.finish_reason)
    output = draft.output(done, logprobs)
    response = draft.finished(output, last.finish_reason, last.usage.completion_tokens, last.usage.cached_tokens)
    if done.tool_calls is None:
        if not opened:
            for e in opening():
                yield e
        if rest:
            yield event("response.output_text.delta", **item, content_index=0, delta=rest, logprobs=[])
        [message] = output
        part = message.content[0]
        yield event("response.output_text.done", **item, content_index=0, text=part.text, logprobs=part.logprobs)
        yield event("response.content_part.done", **item, content_index=0, part=part)
        yield event("response.output_item.done", output_index=0, item=message)
    for k, call in enumerate(output if done.tool_calls is not None else []):
        yield event("response.output_item.added", output_index=k,
                    item=call.model_copy(update={"arguments": "", "status": "in_progress"}))
        yield event("response.function_call_arguments.delta", item_id=call.id, output_index=k, delta=call.arguments)
        yield event("response.function_call_arguments.done", item_id=call.id, output_index=k, name=call.name,
                    arguments=call.arguments)
        yield event("response.output_item.done", output_index=k, item=call)
    _keep(store, response, conversation, reply.text)
    kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
    yield event(kind, response=response)


def _error_event(exc: APIError, sequence_number: int) -> ResponseErrorEvent:
    return ResponseErrorEvent(code=exc.code, message=exc.message, param=exc.param, sequence_number=sequence_number)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=errors.responses(404))
async def get_response(response_id: str, store: ResponseStore = Depends(get_store)) -> ResponseObject:
    return _stored(store, response_id).response


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=errors.responses(404))
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
