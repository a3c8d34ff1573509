"""Tool calling on the live daemon (tiny checkpoint, random weights: every call that
parses is the grammar's doing) on each API that offers it: chat completions and the
Responses API driven with the official openai SDK (and the Agents SDK), Ollama's chat
with the official ollama client; streaming and not. OpenAI's bodies, chunks and events
are checked against its published schemas, and the same conversation and seed must give
the same reply on every API (one tool format, elmd/server/tools.py)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import ollama
import openai
import pytest
from conftest import TINY_MODEL
from openai_schema import validate

from elmd.server.ollama import generate as ollama_generate
from elmd.server.openai.messages import template_messages, tool_use
from elmd.server.openai.schemas import ChatCompletionRequest
from elmd.server.ollama.schemas import OllamaChatRequest
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
FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's tool shape


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


def test_named_function(client):
    completion = client.chat.completions.create(
        model=TINY_MODEL, messages=USER, tools=TOOLS, max_tokens=200, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = completion.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert_calls_valid(calls)


def test_one_call_per_reply_unless_parallel_calls_are_asked_for(client):
    def calls(seed: int, **extra) -> int:  # 0 for a list of calls cut by max_tokens
        message = client.chat.completions.create(model=TINY_MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                                 max_tokens=200, seed=seed, **extra).choices[0].message
        return len(message.tool_calls or [])

    assert {calls(seed) for seed in range(6)} == {1}
    assert {calls(seed, parallel_tool_calls=False) for seed in range(2)} == {1}
    assert max(calls(seed, parallel_tool_calls=True) for seed in range(6)) > 1


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
    messages = template_messages(body.messages, tool_use(body))
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


# --------------------------------------------------------------------------- Responses API


def responses(server, **body) -> dict:
    reply = httpx.post(f"{server.v1}/responses", timeout=120,
                       json={"model": TINY_MODEL, "input": USER, "tools": FLAT_TOOLS, "max_output_tokens": 200, **body})
    assert reply.status_code == 200, reply.text
    validate(reply.json(), "Response")
    return reply.json()


def chat_calls(server, **body) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in raw(server, **body)["choices"][0]["message"]["tool_calls"]]


@pytest.mark.parametrize("seed", [1, 2])
def test_responses_required_gives_function_call_items_as_chat_does(server, client, seed):
    made = responses(server, tool_choice="required", seed=seed)
    assert made["status"] == "completed" and made["tool_choice"] == "required"
    assert [t["name"] for t in made["tools"]] == ["get_weather", "get_time"]
    items = made["output"]
    assert items and all(i["type"] == "function_call" and i["status"] == "completed" for i in items)
    assert all(i["id"].startswith("fc_") and i["call_id"].startswith("call_") for i in items)
    for item in items:
        jsonschema.validate(json.loads(item["arguments"]), PARAMETERS[item["name"]])
    assert [(i["name"], json.loads(i["arguments"])) for i in items] == chat_calls(server, tool_choice="required",
                                                                                   seed=seed)
    response = client.responses.create(model=TINY_MODEL, input=USER, tools=FLAT_TOOLS, tool_choice="required",
                                       max_output_tokens=200, extra_body={"seed": seed})
    assert [(c.name, c.arguments) for c in response.output] == [(i["name"], i["arguments"]) for i in items]


def test_responses_named_function_and_parallel_calls(server):
    named = responses(server, tool_choice={"type": "function", "name": "get_time"}, seed=3)
    assert [i["name"] for i in named["output"]] == ["get_time"]
    assert named["tool_choice"] == {"type": "function", "name": "get_time"}
    single = responses(server, tool_choice="required", seed=4)
    assert len(single["output"]) == 1 and single["parallel_tool_calls"] is False
    several = [responses(server, tool_choice="required", parallel_tool_calls=True, seed=seed) for seed in range(6)]
    assert all(r["parallel_tool_calls"] is True for r in several) and max(len(r["output"]) for r in several) > 1


def test_responses_streamed_calls_are_openai_s_events(server, client):
    body = {"model": TINY_MODEL, "input": USER, "tools": FLAT_TOOLS, "tool_choice": "required",
            "max_output_tokens": 200, "seed": 1, "stream": True}
    streamed = httpx.post(f"{server.v1}/responses", json=body, timeout=120)
    events = [json.loads(block.split("data: ", 1)[1]) for block in streamed.text.split("\n\n") if "data: " in block]
    schemas = {"response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
               "response.output_item.added": "ResponseOutputItemAddedEvent",
               "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
               "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
               "response.output_item.done": "ResponseOutputItemDoneEvent",
               "response.completed": "ResponseCompletedEvent"}
    for event in events:
        validate(event, schemas[event["type"]])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    per_call = ["response.output_item.added", "response.function_call_arguments.delta",
                "response.function_call_arguments.done", "response.output_item.done"]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress",
                                           *per_call * len(final["output"]), "response.completed"]
    assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == final["output"]
    assert [(i["name"], i["arguments"]) for i in final["output"]] == \
           [(i["name"], i["arguments"]) for i in responses(server, tool_choice="required", seed=1)["output"]]
    with client.responses.stream(model=TINY_MODEL, input=USER, tools=FLAT_TOOLS, tool_choice="required",
                                 max_output_tokens=200, extra_body={"seed": 1}) as stream:
        done = [e.arguments for e in stream if e.type == "response.function_call_arguments.done"]
        assert done == [c.arguments for c in stream.get_final_response().output]


def test_responses_answer_under_auto_streams_as_text(server, client):
    body = dict(model=TINY_MODEL, input=USER, tools=FLAT_TOOLS, max_output_tokens=60, temperature=1.0)
    answers = [(seed, r) for seed in range(8)
               if (r := client.responses.create(**body, extra_body={"seed": seed})).output[0].type == "message"]
    assert answers, "no seed answered instead of calling"
    seed, whole = answers[0]
    chat = raw(server, seed=seed, max_tokens=60, temperature=1.0)["choices"][0]["message"]
    assert whole.output_text == chat["content"] and not whole.output_text.startswith('{"response"')
    with client.responses.stream(**body, extra_body={"seed": seed}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text and len(deltas) > 1


def test_responses_function_outputs_continue_as_chat_does(server, client):
    """Function calls and their outputs sent back as input items are the same conversation
    as chat's tool_calls and role-tool messages; previous_response_id carries the calls."""
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": '{"city": "Paris", "unit": "celsius"}'}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "18C"}
    made = responses(server, input=[*USER, call, output], tool_choice="none", max_output_tokens=12, temperature=1.0,
                     seed=6)
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    chat = raw(server, messages=history, tool_choice="none", max_tokens=12, temperature=1.0, seed=6)
    assert made["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]

    first = client.responses.create(model=TINY_MODEL, input=USER, tools=FLAT_TOOLS, tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=200, extra_body={"seed": 5})
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "18 degrees"} for c in first.output]
    second = client.responses.create(model=TINY_MODEL, previous_response_id=first.id, input=outputs, tools=FLAT_TOOLS,
                                     tool_choice="none", max_output_tokens=8)
    alone = client.responses.create(model=TINY_MODEL, input=outputs, tools=FLAT_TOOLS, tool_choice="none",
                                    max_output_tokens=8)
    assert second.output[0].type == "message"
    assert second.usage.input_tokens > alone.usage.input_tokens + len(first.output)  # the call's turn came along


@pytest.mark.parametrize("extra, param", [
    ({"text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "not": {}}}]}, "tools[0].parameters"),
    ({"tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
])
def test_bad_responses_tool_requests_name_the_parameter(server, extra, param):
    body = {"model": TINY_MODEL, "input": USER, "tools": FLAT_TOOLS, **extra}
    reply = httpx.post(f"{server.v1}/responses", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def test_openai_agents_sdk_calls_a_function_tool(server):
    """An Agents SDK agent with a Python function as its tool: the SDK sends the tool's
    strict schema, elmd's grammar makes the call valid, the SDK runs the function and
    (stop_on_first_tool) returns its result."""
    import agents

    called = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"], unit: Literal["celsius", "fahrenheit"]) -> str:
        """Weather in a city."""
        called.append((city, unit))
        return f"18 {unit} in {city}"

    client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    agent = agents.Agent(name="Weather", tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                         model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                             max_tokens=200, extra_body={"seed": 2}),
                         model=agents.OpenAIResponsesModel(model=TINY_MODEL, openai_client=client))
    result = agents.Runner.run_sync(agent, "Weather in Paris?", run_config=agents.RunConfig(tracing_disabled=True))
    assert called and result.final_output == f"18 {called[0][1]} in {called[0][0]}"


# --------------------------------------------------------------------------- Ollama's chat


# Closed sets, so that a random model's calls end within num_predict (the ollama client's
# Tool model keeps a property's type, description and enum, not maxLength).
OLLAMA_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}


def test_ollama_client_calls_as_chat_does(server):
    """The official ollama client with a tool (Ollama has no tool_choice: the model may
    call or answer): for each seed the reply is chat's, streamed or not."""
    client = ollama.Client(host=server.base_url)
    outcomes = set()
    for seed in range(6):
        options = {"seed": seed, "temperature": 1.0, "num_predict": 120}
        reply = client.chat(model=TINY_MODEL, messages=USER, tools=[OLLAMA_TOOL], stream=False, options=options)
        chat = raw(server, tools=[OLLAMA_TOOL], seed=seed, temperature=1.0, max_tokens=120)["choices"][0]["message"]
        if reply.message.tool_calls:
            outcomes.add("call")
            assert [(c.function.name, dict(c.function.arguments)) for c in reply.message.tool_calls] == \
                   [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in chat["tool_calls"]]
            assert reply.message.content == "" and reply.done_reason == "stop"
        else:
            outcomes.add("answer")
            assert reply.message.content == chat["content"] and "tool_calls" not in chat
        streamed = list(client.chat(model=TINY_MODEL, messages=USER, tools=[OLLAMA_TOOL], stream=True, options=options))
        assert "".join(p.message.content for p in streamed) == reply.message.content
        calls = [c for p in streamed for c in p.message.tool_calls or []]
        assert [(c.function.name, c.function.arguments) for c in calls] == \
               [(c.function.name, c.function.arguments) for c in reply.message.tool_calls or []]
        assert streamed[-1].done and not streamed[-1].message.tool_calls
    assert outcomes == {"call", "answer"}, outcomes


def test_ollama_round_trip_renders_calls_and_results():
    body = OllamaChatRequest.model_validate({
        "model": TINY_MODEL, "tools": TOOLS,
        "messages": [*USER,
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
                     {"role": "tool", "content": "18C"},  # no tool_name: the call it answers is the last one
                     {"role": "assistant", "content": "It is 18C."},
                     {"role": "tool", "content": "9C", "tool_name": "get_weather"}]})
    messages = ollama_generate.chat_messages(body, ollama_generate.tool_use(body))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert '"name": "get_weather"' in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"tool_calls": [{"name": "get_weather",
                                                                  "arguments": {"city": "Paris", "unit": "celsius"}}]}
    assert json.loads(messages[3]["content"]) == {"tool_response": {"name": "get_weather", "content": "18C"}}
    assert json.loads(messages[4]["content"]) == {"response": "It is 18C."}
    assert json.loads(messages[5]["content"])["tool_response"]["name"] == "get_weather"


def test_ollama_tool_results_continue_the_conversation(server):
    client = ollama.Client(host=server.base_url)
    first = client.chat(model=TINY_MODEL, messages=USER, tools=[OLLAMA_TOOL], options={"seed": 0, "num_predict": 200})
    history = [*USER, first.message]
    history += [{"role": "tool", "content": "18", "tool_name": c.function.name} for c in first.message.tool_calls or []]
    reply = client.chat(model=TINY_MODEL, messages=history, tools=[OLLAMA_TOOL], options={"seed": 1, "num_predict": 16})
    assert reply.done and (reply.message.content or reply.message.tool_calls)
