"""OpenAI's Responses API (POST/GET/DELETE /v1/responses) driven like a user: the official
`openai` SDK's `responses.create` and `responses.stream`, and raw HTTP for the SSE framing,
every body and event validated against OpenAI's published schemas."""

from __future__ import annotations

import json
import time
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import TINY_MODEL, sse
from openai_schema import validate

EVENT_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent", "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent", "error": "ResponseErrorEvent",
}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


# The tiny model's greedy answers are whitespace (stripped to ""), so comparisons sample with a seed.
SEEDED = {"temperature": 1.0, "extra_body": {"seed": 3}}


def body(**extra) -> dict:
    return {"model": TINY_MODEL, "input": "Name a colour.", "max_output_tokens": 8, **extra}


def raw(**extra) -> dict:
    """A request body for httpx: the SDK's extra_body merged in."""
    request = body(**extra)
    extra_body = request.pop("extra_body", {})
    return {**request, **extra_body}


def chat_text(server, messages, max_tokens=8) -> str:
    """The chat route's answer with SEEDED sampling: the reference for the same conversation."""
    reply = httpx.post(f"{server.v1}/chat/completions", json={"model": TINY_MODEL, "messages": messages,
                                                              "max_tokens": max_tokens, "temperature": 1.0, "seed": 3})
    return reply.json()["choices"][0]["message"]["content"]


def prompt_tokens(server, messages) -> int:
    return httpx.post(f"{server.base_url}/tokenize", json={"messages": messages}).json()["count"]


def test_create_with_the_sdk_matches_schema_and_chat(server, client):
    response = client.responses.create(**body(instructions="Be brief.", metadata={"k": "v"}, **SEEDED))
    made = httpx.post(f"{server.v1}/responses", json=raw(instructions="Be brief.", **SEEDED)).json()
    validate(made, "Response")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == made["output"][0]["content"][0]["text"] == chat_text(server, messages)
    assert response.output_text.strip()
    assert response.output[0].role == "assistant" and response.output[0].content[0].type == "output_text"
    assert response.usage.input_tokens == prompt_tokens(server, messages)
    assert response.usage.output_tokens == 8 and response.usage.total_tokens == response.usage.input_tokens + 8
    assert response.instructions == "Be brief." and response.metadata == {"k": "v"} and response.temperature == 1.0


def test_stop_sequence_completes(client):
    full = client.responses.create(**body(max_output_tokens=12, **SEEDED)).output_text
    stop = full.strip()[2:5]
    assert len(stop) == 3
    stopped = client.responses.create(**body(max_output_tokens=12, temperature=1.0,
                                             extra_body={"seed": 3, "stop": [stop]}))
    assert stopped.status == "completed" and stopped.incomplete_details is None
    assert stopped.output_text == full[: full.index(stop)]


def test_stream_with_the_sdk_equals_create(client):
    full = client.responses.create(**body(max_output_tokens=12, **SEEDED)).output_text
    stop = full.strip()[2:5]
    assert len(stop) == 3
    with client.responses.stream(**body(max_output_tokens=12, temperature=1.0),
                                 extra_body={"seed": 3, "stop": [stop]}) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas) == full[: full.index(stop)]
    assert final.usage.output_tokens > 0


def test_stream_events_follow_openai_order_and_schemas(server):
    with httpx.stream("POST", f"{server.v1}/responses", json=raw(stream=True, **SEEDED)) as response:
        response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in response.text
    events = sse(response)
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert names[:4] == EVENT_ORDER and names[-4:] == CLOSING + ["response.incomplete"]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    for name, data in events:
        validate(data, EVENT_SCHEMAS[name])
        validate(data, "ResponseStreamEvent")
    deltas = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == deltas == events[-4][1]["text"]
    assert deltas == chat_text(server, [{"role": "user", "content": "Name a colour."}]) and deltas.strip()
    assert final["usage"]["output_tokens"] == 8
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["id"] == final["id"]


def test_logprobs_as_chat_reports_them(server, client):
    asked = dict(include=["message.output_text.logprobs"], top_logprobs=2, **SEEDED)
    response = client.responses.create(**body(**asked))
    made = httpx.post(f"{server.v1}/responses", json=raw(**asked)).json()
    validate(made, "Response")
    chat = httpx.post(f"{server.v1}/chat/completions", json={
        "model": TINY_MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
        "temperature": 1.0, "seed": 3, "logprobs": True, "top_logprobs": 2}).json()["choices"][0]["logprobs"]["content"]
    logprobs = [entry.model_dump() for entry in response.output[0].content[0].logprobs]
    assert logprobs == made["output"][0]["content"][0]["logprobs"] == chat and len(chat) == 8
    assert response.top_logprobs == 2 and all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    with httpx.stream("POST", f"{server.v1}/responses", json=raw(stream=True, **asked)) as streamed:
        streamed.read()
    events = sse(streamed)
    for name, data in events:
        validate(data, EVENT_SCHEMAS[name])
    deltas = [entry for name, data in events if name == "response.output_text.delta" for entry in data["logprobs"]]
    done = next(data for name, data in events if name == "response.output_text.done")
    assert deltas == done["logprobs"] == events[-1][1]["response"]["output"][0]["content"][0]["logprobs"] == chat
    plain = client.responses.create(**body(**SEEDED))
    assert plain.output[0].content[0].logprobs == [] and plain.top_logprobs is None


def test_previous_response_id_continues_the_conversation(server, client):
    first = client.responses.create(**body(instructions="Be brief.", **SEEDED))
    second = client.responses.create(**body(input="And another?", previous_response_id=first.id, **SEEDED))
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "And another?"}]  # instructions do not carry over, as OpenAI's
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == prompt_tokens(server, messages)
    assert second.output_text == chat_text(server, messages) and first.output_text.strip()


def test_message_items_and_earlier_output_are_accepted(server, client):
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Red."}]},
             {"role": "user", "content": "Another?"}]
    response = client.responses.create(**body(input=items, **SEEDED))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]
    assert response.usage.input_tokens == prompt_tokens(server, messages)
    assert response.output_text == chat_text(server, messages)


def test_retrieve_delete_and_store_false(server, client):
    made = client.responses.create(**body())
    assert client.responses.retrieve(made.id).output_text == made.output_text
    validate(httpx.get(f"{server.v1}/responses/{made.id}").json(), "Response")
    deleted = httpx.delete(f"{server.v1}/responses/{made.id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": made.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    unkept = client.responses.create(**body(store=False))
    assert unkept.store is False
    missing = httpx.get(f"{server.v1}/responses/{unkept.id}")
    assert missing.status_code == 404
    validate(missing.json(), "ErrorResponse")
    followup = httpx.post(f"{server.v1}/responses", json=body(previous_response_id=unkept.id))
    assert followup.status_code == 404 and followup.json()["error"]["param"] == "previous_response_id"


def test_streamed_response_is_stored(server, client):
    with client.responses.stream(**body(**SEEDED)) as stream:
        events = list(stream)
    final = events[-1].response
    assert events[-1].type == "response.incomplete"
    assert client.responses.retrieve(final.id).output_text == final.output_text


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0].type"),
])
def test_unsupported_features_are_refused_by_name(server, extra, param):
    response = httpx.post(f"{server.v1}/responses", json=body(**extra))
    assert response.status_code == 400
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param and response.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize("extra, param, status", [
    ({"max_output_tokens": "8"}, "max_output_tokens", 400),
    ({"temperature": 3}, "temperature", 400),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role", 400),
    ({"max_output_tokens": 10**6}, "max_output_tokens", 400),
    ({"input": []}, "input", 400),
    ({"top_logprobs": 50}, "top_logprobs", 400),
    ({"keep_alive": "soon"}, "keep_alive", 400),
    ({"model": "no-such-model"}, "model", 404),
    ({"tool_choice": "required"}, "tool_choice", 400),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id", 400),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments", 400),
])
def test_bad_input_gets_an_error_object(server, extra, param, status):
    response = httpx.post(f"{server.v1}/responses", json=body(**extra))
    assert response.status_code == status
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("name", ["bogus_param", "timings_per_token"])
def test_unknown_parameters_are_refused_as_openai_refuses_them(server, name):
    response = httpx.post(f"{server.v1}/responses", json=body(**{name: True}))
    assert response.status_code == 400
    validate(response.json(), "ErrorResponse")
    error = response.json()["error"]
    assert error["message"] == f"Unrecognized request argument supplied: {name}" and error["param"] == name


def test_the_chat_route_s_extras_are_accepted(server):
    extras = dict(seed=3, stop=["\n"], top_k=5, min_p=0.1, repetition_penalty=1.1, presence_penalty=0.5,
                  frequency_penalty=0.5, ignore_eos=True, keep_alive="5m", max_output_tokens=4)
    response = httpx.post(f"{server.v1}/responses", json=body(**extras))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["output_tokens"] == 4  # ignore_eos: exactly max_output_tokens


def test_empty_settings_of_unsupported_features_are_accepted(client):
    """What SDK-based agents send when no tool or reasoning is configured."""
    response = client.responses.create(**body(tools=[], include=[], tool_choice="auto", truncation="disabled",
                                              parallel_tool_calls=True, reasoning={"effort": None},
                                              text={"format": {"type": "text"}}))
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens > 0
    assert response.tool_choice == "auto" and response.tools == [] and response.parallel_tool_calls is True
    made = client.responses.create(**body(tool_choice="none", parallel_tool_calls=False))
    assert made.tool_choice == "none" and made.parallel_tool_calls is False


def test_sdk_raises_on_bad_requests(client):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(**body(text={"format": {"type": "json_schema", "name": "x"}}))  # no schema
    with pytest.raises(openai.NotFoundError):
        client.responses.create(**body(model="no-such-model"))


def test_a_failure_mid_stream_is_an_error_event(start_server, tiny_checkpoint):
    running = start_server(tiny_checkpoint, request_timeout=0.3, keep_alive=-1)
    deadline = time.monotonic() + 60
    while httpx.get(f"{running.base_url}/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # loaded: the timeout then falls in the middle of the generation
    long = raw(max_output_tokens=1500, extra_body={"ignore_eos": True})
    plain = httpx.post(f"{running.v1}/responses", json=long, timeout=60)
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "timeout"
    streamed = httpx.post(f"{running.v1}/responses", json={**long, "stream": True}, timeout=60)
    events = sse(streamed)
    name, error = events[-1]
    assert name == "error" and error["code"] == "timeout" and "[DONE]" not in streamed.text
    validate(error, "ResponseErrorEvent")
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))


def test_openai_agents_sdk_runs_an_agent_on_elmd(server):
    """The OpenAI Agents SDK, which speaks the Responses API by default: two turns (the
    second continues from the first's response id), run and streamed. The SDK fails a
    response that ends `incomplete`, so each turn stops at a stop sequence taken from the
    chat route's answer to the same conversation."""
    import asyncio

    import agents

    config = agents.RunConfig(tracing_disabled=True)  # tracing would upload to OpenAI

    def agent_stopping_at(messages: list[dict]) -> tuple[object, str]:
        full = chat_text(server, messages, max_tokens=12)
        stop = full.strip()[2:5]
        settings = agents.ModelSettings(max_tokens=12, temperature=1.0, extra_body={"seed": 3, "stop": [stop]})
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)  # one per event loop
        agent = agents.Agent(name="Brief", instructions="Be brief.", model_settings=settings,
                             model=agents.OpenAIResponsesModel(model=TINY_MODEL, openai_client=client))
        return agent, full[: full.index(stop)]

    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    agent, expected = agent_stopping_at(history)
    first = agents.Runner.run_sync(agent, "Name a colour.", run_config=config)
    assert first.final_output == expected and expected.strip()

    history += [{"role": "assistant", "content": first.final_output}, {"role": "user", "content": "And another?"}]
    agent, expected = agent_stopping_at(history)

    async def streamed() -> tuple[str, str]:
        run = agents.Runner.run_streamed(agent, "And another?", run_config=config,
                                         previous_response_id=first.last_response_id)
        deltas = [event.data.delta async for event in run.stream_events()
                  if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"]
        return "".join(deltas), run.final_output

    deltas, final = asyncio.run(streamed())
    assert deltas == final == expected and expected.strip()


POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "label": {"enum": ["a", "b"]}},
         "required": ["x", "label"], "additionalProperties": False}


def test_text_format_constrains_the_output_and_is_echoed(server, client):
    """The tiny model has random weights: every valid output is the grammar's doing."""
    text_format = {"type": "json_schema", "name": "point", "schema": POINT, "strict": True}
    response = client.responses.create(**body(max_output_tokens=64, text={"format": text_format}))
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), POINT)
    raw = httpx.post(f"{server.v1}/responses", json=body(max_output_tokens=64, text={"format": text_format})).json()
    validate(raw, "Response")
    assert raw["text"]["format"] == text_format
    with client.responses.stream(**body(max_output_tokens=64, text={"format": text_format})) as stream:
        events = list(stream)
    assert events[-1].type == "response.completed"
    jsonschema.validate(json.loads(events[-1].response.output_text), POINT)
    # any object: a random model may write one key until the limit; what it wrote is JSON so far
    anything = client.responses.create(**body(max_output_tokens=32, text={"format": {"type": "json_object"}}))
    assert anything.output_text.startswith("{")
    if anything.status == "completed":
        assert isinstance(json.loads(anything.output_text), dict)


def test_parse_returns_the_sdk_s_object(client):
    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=0, le=99)  # unbounded, a random model may write digits until the limit
        label: Literal["a", "b"]

    for seed in range(3):
        parsed = client.responses.parse(**body(max_output_tokens=64, extra_body={"seed": seed}),
                                        text_format=Point).output_parsed
        assert isinstance(parsed, Point)


def test_a_schema_llguidance_cannot_follow_names_the_parameter(server):
    unfollowable = {"type": "json_schema", "name": "x", "schema": {"not": {"type": "string"}}}
    response = httpx.post(f"{server.v1}/responses", json=body(text={"format": unfollowable}))
    assert response.status_code == 400 and response.json()["error"]["param"] == "text.format.schema"
