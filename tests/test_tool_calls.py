"""Tool calling on the live daemon (tiny checkpoint, random weights: every call that
parses is the grammar's doing), driven with the official SDK, streaming and not; every
response and chunk checked against OpenAI's published schemas."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import TINY_MODEL
from openai_schema import validate

from elmd.server.routes_chat import template_messages
from elmd.server.schemas import ChatCompletionRequest
from elmd.server.tools import parse_reply

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def raw(server, **body) -> dict:
    reply = httpx.post(f"{server.v1}/chat/completions", timeout=120,
                       json={"model": TINY_MODEL, "messages": USER, "tools": TOOLS, "max_tokens": 200, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def assert_calls_valid(calls) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("seed", [1, 2])
def test_required_gives_valid_calls(server, client, seed):
    body = raw(server, tool_choice="required", seed=seed)
    validate(body, "CreateChatCompletionResponse")
    completion = client.chat.completions.create(model=TINY_MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                                max_tokens=200, seed=seed)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_calls_valid(choice.message.tool_calls)


def test_named_function_and_no_parallel_calls(client):
    completion = client.chat.completions.create(
        model=TINY_MODEL, messages=USER, tools=TOOLS, max_tokens=200, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = completion.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert_calls_valid(calls)
    completion = client.chat.completions.create(model=TINY_MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, max_tokens=200, seed=4)
    assert len(completion.choices[0].message.tool_calls) == 1


def test_auto_answers_or_calls_and_none_answers_text(client):
    for seed in range(4):
        choice = client.chat.completions.create(model=TINY_MODEL, messages=USER, tools=TOOLS, max_tokens=200,
                                                seed=seed, temperature=1.0).choices[0]
        if choice.finish_reason == "tool_calls":
            assert_calls_valid(choice.message.tool_calls)
        else:  # an answer: a random model's string may run to max_tokens
            assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
            assert not choice.message.content.startswith('{"response"')  # the answer itself, even when cut
    choice = client.chat.completions.create(model=TINY_MODEL, messages=USER, tools=TOOLS, tool_choice="none",
                                            max_tokens=8).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


def test_streamed_tool_calls_are_framed_as_openai_frames_them(server, client):
    with httpx.stream("POST", f"{server.v1}/chat/completions", timeout=120,
                      json={"model": TINY_MODEL, "messages": USER, "tools": TOOLS, "tool_choice": "required",
                            "max_tokens": 200, "seed": 1, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert set(first["tool_calls"][0]) == {"index", "id", "type", "function"}
    assert first["tool_calls"][0]["function"]["arguments"] == ""
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    # the SDK's own accumulation gives the same calls as the non-streamed reply
    stream = client.chat.completions.create(model=TINY_MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                            max_tokens=200, seed=1, stream=True)
    calls: dict[int, dict] = {}
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    whole = client.chat.completions.create(model=TINY_MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, seed=1).choices[0].message.tool_calls
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
           [(c.function.name, json.loads(c.function.arguments)) for c in whole]


@pytest.mark.parametrize("stream", [False, True])
def test_round_trip_call_result_answer(client, stream):
    first = client.chat.completions.create(model=TINY_MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, seed=5).choices[0].message
    history = [*USER, first.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"} for call in first.tool_calls]
    reply = client.chat.completions.create(model=TINY_MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=16, seed=6, stream=stream)
    if stream:
        chunks = list(reply)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        assert reply.choices[0].message.content and reply.choices[0].message.tool_calls is None


def test_history_is_rendered_in_the_generic_format():
    body = ChatCompletionRequest.model_validate({
        "model": TINY_MODEL, "tools": TOOLS,
        "messages": [*USER,
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                     {"role": "assistant", "content": "It is 18C."},
                     {"role": "user", "content": "Thanks"}]})
    messages = template_messages(body.messages, body)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert '"name": "get_weather", "description": "Weather in a city"' in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"tool_calls": [{"name": "get_weather",
                                                                  "arguments": {"city": "Paris", "unit": "celsius"}}]}
    assert json.loads(messages[3]["content"]) == {"tool_response": {"tool_call_id": "call_1", "name": "get_weather",
                                                                    "content": "18C"}}
    assert json.loads(messages[4]["content"]) == {"response": "It is 18C."}


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools"),
])
def test_bad_tool_requests_name_the_parameter(server, extra, param):
    body = {"model": TINY_MODEL, "messages": USER, "tools": TOOLS, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    reply = httpx.post(f"{server.v1}/chat/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def test_a_cut_answer_is_its_text_so_far():
    assert parse_reply('{"response":"Paris is', "length").content == "Paris is"
    assert parse_reply('{"response":"caf\\u00e', "length").content == "caf"  # half an escape held back
    assert parse_reply('{"response":"Paris."}', "stop").content == "Paris."
    cut_call = parse_reply('{"tool_calls":[{"na', "length")
    assert cut_call.tool_calls is None and cut_call.finish_reason == "length"


def test_streamed_answer_under_auto_streams_as_content(client):
    body = dict(model=TINY_MODEL, messages=USER, tools=TOOLS, max_tokens=60, temperature=1.0)
    answers = [(seed, c) for seed in range(8)
               if (c := client.chat.completions.create(**body, seed=seed).choices[0]).finish_reason != "tool_calls"]
    assert answers, "no seed answered instead of calling"
    seed, whole = answers[0]
    chunks = [c for c in client.chat.completions.create(**body, seed=seed, stream=True) if c.choices]
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(contents) == whole.message.content
    assert len(contents) > 1  # as it is written, not in one piece at the end
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
