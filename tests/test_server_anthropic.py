"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) driven like a
user: the official `anthropic` SDK's create, stream and count_tokens, a tool round trip,
raw HTTP for the SSE framing and the error shapes; every body and event validated against
the SDK's own types. The same conversation gives the same reply through /v1/messages as
through chat (one pipeline, one tool engine)."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pydantic
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from conftest import TINY_MODEL, sse

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
           "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}]
CHAT_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                "parameters": t["input_schema"]}} for t in TOOLS]
USER = [{"role": "user", "content": "Weather in Paris?"}]
# The tiny model's greedy replies are whitespace; comparisons sample with a seed (an extra, as on chat).
# The newest SDK has no `temperature` argument any more; the API still takes it, as older clients send it.
SEEDED = {"extra_body": {"temperature": 1.0, "seed": 3}}
EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)


def validate_event(data: dict) -> None:
    """Against the SDK's event types (its union leaves out `ping`, which its decoder skips)."""
    if data["type"] == "ping":
        assert data == {"type": "ping"}
    else:
        EVENTS.validate_python(data)


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def chat(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def post(server, path: str = "/v1/messages", **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": TINY_MODEL, "messages": USER, **body}, timeout=120)


def test_create_answers_as_the_sdk_types_it(server, client):
    message = client.messages.create(model=TINY_MODEL, max_tokens=8, messages=USER, **SEEDED)
    assert isinstance(message, Message) and message.role == "assistant" and message.model == TINY_MODEL
    assert message.id.startswith("msg_") and message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens <= 8 and message.usage.input_tokens > 0
    raw = post(server, max_tokens=8, temperature=1.0, seed=3).json()
    Message.model_validate(raw)
    assert set(raw) == {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    assert raw["content"] == [block.model_dump() for block in message.content]  # seeded: the same reply, every field


def test_the_same_conversation_gives_the_same_reply_as_chat(client, chat):
    system = "Answer briefly."
    for seed in (1, 2, 3):
        message = client.messages.create(model=TINY_MODEL, max_tokens=12, system=system, messages=USER,
                                         extra_body={"temperature": 1.0, "seed": seed})
        completion = chat.chat.completions.create(model=TINY_MODEL, max_tokens=12, temperature=1.0, seed=seed,
                                                  messages=[{"role": "system", "content": system}, *USER])
        assert message.content[0].text == completion.choices[0].message.content
        assert message.usage.output_tokens == completion.usage.completion_tokens
        assert message.usage.input_tokens + message.usage.cache_read_input_tokens == completion.usage.prompt_tokens


def test_a_tool_round_trip_matches_chat_turn_for_turn(client, chat):
    first = client.messages.create(model=TINY_MODEL, max_tokens=200, messages=USER, tools=TOOLS,
                                   tool_choice={"type": "any"}, **SEEDED)
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert call.type == "tool_use" and call.name == "get_weather" and set(call.input) == {"city"}
    chat_first = chat.chat.completions.create(model=TINY_MODEL, max_tokens=200, messages=USER, tools=CHAT_TOOLS,
                                              tool_choice="required", temperature=1.0, seed=3).choices[0].message
    assert json.loads(chat_first.tool_calls[0].function.arguments) == call.input

    history = [*USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": call.name,
                                                          "input": call.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"}]}]
    answer = client.messages.create(model=TINY_MODEL, max_tokens=20, messages=history, tools=TOOLS,
                                    tool_choice={"type": "none"}, **SEEDED)
    chat_history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}]
    chat_answer = chat.chat.completions.create(model=TINY_MODEL, max_tokens=20, messages=chat_history,
                                               tools=CHAT_TOOLS, tool_choice="none", temperature=1.0, seed=3)
    assert answer.content[0].text == chat_answer.choices[0].message.content
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_stream_sends_anthropics_events_in_its_order(server, client):
    with client.messages.stream(model=TINY_MODEL, max_tokens=8, messages=USER, **SEEDED) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    whole = client.messages.create(model=TINY_MODEL, max_tokens=8, messages=USER, **SEEDED)
    assert text == final.content[0].text == whole.content[0].text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.stop_reason == whole.stop_reason

    response = post(server, max_tokens=8, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response)
    for name, data in events:
        assert name == data["type"]
        validate_event(data)
    kinds = [name for name, _ in events]
    assert kinds[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"] or \
        kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) <= {"content_block_delta"}
    assert events[-2][1]["usage"]["output_tokens"] == 8 and events[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_streamed_tool_use_is_framed_as_input_json_deltas(server, client):
    response = post(server, max_tokens=200, tools=TOOLS, tool_choice={"type": "any"}, stream=True, seed=3,
                    temperature=1.0)
    events = sse(response)
    for _, data in events:
        validate_event(data)
    start = next(data for name, data in events if name == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    partial = "".join(data["delta"]["partial_json"] for name, data in events if name == "content_block_delta")
    with client.messages.stream(model=TINY_MODEL, max_tokens=200, messages=USER, tools=TOOLS,
                                tool_choice={"type": "any"}, **SEEDED) as stream:
        final = stream.get_final_message()
    assert json.loads(partial) == final.content[0].input
    assert final.stop_reason == "tool_use"


def test_stop_sequences_are_reported_by_name(server, client):
    free = client.messages.create(model=TINY_MODEL, max_tokens=30, messages=USER, **SEEDED).content[0].text
    word = free.split()[1] if len(free.split()) > 1 else free.strip()[:3]
    cut = client.messages.create(model=TINY_MODEL, max_tokens=30, messages=USER, stop_sequences=["zzz", word],
                                 **SEEDED)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word
    assert word not in cut.content[0].text and free.startswith(cut.content[0].text)


def test_count_tokens_is_what_the_reply_is_billed(client):
    counted = client.messages.count_tokens(model=TINY_MODEL, messages=USER, system="Be brief.")
    assert isinstance(counted, MessageTokensCount)
    billed = client.messages.create(model=TINY_MODEL, max_tokens=1, messages=USER, system="Be brief.")
    assert counted.input_tokens == billed.usage.input_tokens + billed.usage.cache_read_input_tokens
    with_tools = client.messages.count_tokens(model=TINY_MODEL, messages=USER, tools=TOOLS)
    assert with_tools.input_tokens > client.messages.count_tokens(model=TINY_MODEL, messages=USER).input_tokens


@pytest.mark.parametrize("body, status, words", [
    ({"max_tokens": 8, "thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "'thinking'"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, 400,
     "'messages[0].content[0].type'"),
    ({"max_tokens": 8, "tools": [{"type": "web_search_20250305", "name": "web_search", "input_schema": {}}]}, 400,
     "'tools[0].type'"),
    ({"max_tokens": 8, "frobnicate": 1}, 400, "frobnicate"),
    ({"messages": USER}, 400, "'max_tokens'"),
    ({"max_tokens": 8, "temperature": "hot"}, 400, "'temperature'"),
    ({"max_tokens": 8, "model": "no-such-model"}, 404, "no-such-model"),
    ({"max_tokens": 100000}, 400, "'max_tokens'"),
])
def test_errors_take_anthropics_shape(server, body, status, words):
    response = post(server, **body)
    assert response.status_code == status
    error = response.json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert words in error["error"]["message"]


def test_the_sdk_raises_its_own_errors(client):
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="no-such-model", max_tokens=8, messages=USER)
    assert raised.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=TINY_MODEL, max_tokens=8, messages=USER, stop_sequences=["x"] * 17)


def test_the_api_key_is_accepted_as_x_api_key(tiny_checkpoint, start_server):
    running = start_server(tiny_checkpoint, keep_alive=-1, api_key="sk-local-test")
    keyed = anthropic.Anthropic(base_url=running.base_url, api_key="sk-local-test", max_retries=0,
                                default_headers={"anthropic-beta": "tools-2024-04-04"})
    assert keyed.messages.count_tokens(model=TINY_MODEL, messages=USER).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as raised:
        anthropic.Anthropic(base_url=running.base_url, api_key="wrong", max_retries=0).messages.count_tokens(
            model=TINY_MODEL, messages=USER)
    assert raised.value.body["error"]["type"] == "authentication_error"


def test_output_config_format_constrains_the_reply_to_the_schema(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"],
              "additionalProperties": False}
    message = client.messages.create(model=TINY_MODEL, max_tokens=60, messages=USER, **SEEDED,
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
    assert message.stop_reason == "end_turn"
    assert set(json.loads(message.content[0].text)) == {"colour"}
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model=TINY_MODEL, max_tokens=8, messages=USER, tools=TOOLS,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    assert "output_config.format" in raised.value.body["error"]["message"]
