"""Structured output and tool calling on real weights (SmolLM2-135M-Instruct, the offline
model), served by the real daemon and driven by the official SDK."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import build_app, serve_app
from offline_checkpoint import converted
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app, manager = build_app(converted(tmp_path_factory), model_id=MODEL, keep_alive=-1)
    with serve_app(app, manager) as running:
        running.wait_healthy(120, what="the offline model")
        yield openai.OpenAI(base_url=running.v1, api_key="unused", max_retries=0, timeout=600)


def test_sdk_parse_on_the_real_model(client):
    completion = client.chat.completions.parse(
        model=MODEL, temperature=0, max_tokens=60, response_format=City,
        messages=[{"role": "user", "content": "The capital of France as JSON: name, country, population."}])
    city = completion.choices[0].message.parsed
    assert isinstance(city, City) and city.name == "Paris"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip_on_the_real_model(client, stream):
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], temperature=0,
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=40)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    history = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees Celsius and sunny"}]
    # tool_choice "none" for the answer: under "auto" this 135M model calls get_weather again (and
    # under "none" it may imitate the call's JSON as text): the round trip's mechanics are what is tested
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], temperature=0,
                                           tool_choice="none", max_tokens=40, stream=stream)
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    else:
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert reply.choices[0].message.tool_calls is None
    assert finish in ("stop", "length") and text
