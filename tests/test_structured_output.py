"""Structured output against the real daemon (tiny checkpoint, random weights: the model
knows nothing, so every valid output is the grammar's doing): response_format, llama.cpp's
json_schema and grammar, logit_bias, and unknown parameters refused as OpenAI refuses them."""

from __future__ import annotations

import datetime
import json
import re

import httpx
import jsonschema
import openai
import pytest
from conftest import TINY_MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_schema import validate

USER = [{"role": "user", "content": "Describe a person."}]


def chat(server, **body) -> httpx.Response:
    return httpx.post(f"{server.v1}/chat/completions", json={"model": TINY_MODEL, "messages": USER, **body}, timeout=120)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date", raises=ValueError)
def _rfc3339_date(value) -> bool:
    """RFC 3339's full-date: years 0000-9999 (Python's date, jsonschema's default check,
    starts at year 1); the day checked against the month in a leap year."""
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        return False
    datetime.date(2000, int(value[5:7]), int(value[8:10]))
    return True


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, cls=jsonschema.Draft202012Validator, format_checker=FORMATS)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 8},
        "role": {"enum": ["admin", "user", "guest"]},
        "id": {"type": "string", "format": "uuid"},
        "born": {"type": "string", "format": "date"},
        "address": {"$ref": "#/$defs/address"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "score": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "null"}]},
    },
    "required": ["name", "role", "id", "born", "address", "tags", "score"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                          "required": ["city", "zip"], "additionalProperties": False}},
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_validates(server, seed):
    body = chat(server, response_format=schema_format(PERSON), max_tokens=400, seed=seed, temperature=1.0).json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert_valid(body["choices"][0]["message"]["content"], PERSON)


def test_json_schema_streamed_chunks_validate(server):
    with httpx.stream("POST", f"{server.v1}/chat/completions", timeout=120,
                      json={"model": TINY_MODEL, "messages": USER, "response_format": schema_format(PERSON),
                            "max_tokens": 400, "seed": 5, "stream": True}) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert_valid("".join(c["choices"][0]["delta"].get("content", "") for c in chunks), PERSON)


def test_json_object_is_an_object(server):
    body = chat(server, response_format={"type": "json_object"}, max_tokens=300, seed=4).json()
    choice = body["choices"][0]
    if choice["finish_reason"] == "stop":  # any object may be long: only a complete one must parse
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].startswith("{")


def test_max_tokens_cut_says_length(server):
    body = chat(server, response_format=schema_format(PERSON), max_tokens=5).json()
    assert body["choices"][0]["finish_reason"] == "length"


def test_sdk_parse_returns_the_model(server):
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=6)
        legs: int = Field(ge=0, le=8)
        kind: str = Field(pattern="^(cat|dog)$")

    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(model=TINY_MODEL, messages=USER, response_format=Pet, max_tokens=200,
                                               seed=1)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8 and pet.kind in ("cat", "dog")


def test_unsupported_schema_feature_is_named(server):
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    error = chat(server, response_format=schema_format(schema)).json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and "not" in error["message"]
    assert chat(server, max_tokens=2).status_code == 200  # still serving


def test_llamacpp_json_schema_and_grammar_aliases(server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    for path, body in (("chat/completions", {"messages": USER}), ("completions", {"prompt": "Answer:"})):
        reply = httpx.post(f"{server.v1}/{path}", json={"model": TINY_MODEL, "json_schema": schema, "max_tokens": 50,
                                                        **body}, timeout=120).json()
        choice = reply["choices"][0]
        assert_valid(choice["message"]["content"] if "message" in choice else choice["text"], schema)
    reply = chat(server, grammar='root ::= ("yes" | "no") "!"', max_tokens=20, seed=2).json()
    assert reply["choices"][0]["message"]["content"] in ("yes!", "no!")
    error = chat(server, grammar="root ::= (").json()["error"]
    assert error["param"] == "grammar"
    error = chat(server, grammar='root ::= "a"', json_schema={"type": "object"}).json()["error"]
    assert error["param"] == "grammar" and "cannot be combined" in error["message"]


@pytest.mark.parametrize("name", ["frobnicate", "n_predict", "cache_prompt"])
def test_unknown_parameters_are_refused_as_openai_does(server, name):
    response = chat(server, **{name: 1})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": f"Unrecognized request argument supplied: {name}",
                                        "type": "invalid_request_error", "param": name, "code": None}
    response = httpx.post(f"{server.v1}/completions", json={"model": TINY_MODEL, "prompt": "Hi", name: 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == name
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=name):
        client.chat.completions.create(model=TINY_MODEL, messages=USER, extra_body={name: 1})


def test_documented_extensions_are_accepted(server):
    assert chat(server, max_tokens=2, top_k=5, min_p=0.1, repetition_penalty=1.1, ignore_eos=True,
                keep_alive="5m").status_code == 200


def test_logit_bias_forces_and_bans_tokens(server):
    forced = chat(server, logit_bias={"300": 100}, max_tokens=4, temperature=1.0, seed=3, logprobs=True).json()
    engine = server.manager.loaded()[TINY_MODEL]
    assert [t["token"] for t in forced["choices"][0]["logprobs"]["content"]] == [engine.tokenizer.token_text(300)] * 4
    plain = httpx.post(f"{server.v1}/completions", json={"model": TINY_MODEL, "prompt": "Hello", "max_tokens": 1,
                                                         "temperature": 0, "logprobs": 1}).json()
    first = plain["choices"][0]["logprobs"]["tokens"][0]
    same_text = [i for i in range(engine.tokenizer.vocab_size) if engine.tokenizer.token_text(i) == first]  # a piece and its byte
    banned = httpx.post(f"{server.v1}/completions", json={"model": TINY_MODEL, "prompt": "Hello", "max_tokens": 1,
                                                          "temperature": 0, "logprobs": 1,
                                                          "logit_bias": {str(i): -100 for i in same_text}}).json()
    assert banned["choices"][0]["logprobs"]["tokens"][0] != first


@pytest.mark.parametrize("bias, message", [({"abc": 1}, "not a token id"), ({"99999": 1}, "not a token id"),
                                           ({"5": 101}, "")])
def test_logit_bias_out_of_range_is_400(server, bias, message):
    error = chat(server, logit_bias=bias, max_tokens=2).json()["error"]
    assert error["param"].startswith("logit_bias") and message in error["message"]


# ------------------------------------------------------------------ random schemas

NAMES = st.sampled_from(["a", "b", "name", "value", "x_1", "item"])
LEAVES = st.one_of(
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-1000, 1000), st.integers(0, 1000)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text("abcxyz", min_size=1, max_size=4) | st.integers(-9, 9), min_size=1, max_size=3, unique=True)
    .map(lambda values: {"enum": values}),
    st.sampled_from(["date", "uuid", "ipv4"]).map(lambda f: {"type": "string", "format": f}),
    st.just({"type": "string", "pattern": "^[a-z]{1,4}$"}),
)


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": sorted(properties), "additionalProperties": False}


SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.dictionaries(NAMES, inner, min_size=1, max_size=3).map(_object),
        st.tuples(inner, st.integers(0, 2)).map(lambda t: {"type": "array", "items": t[0], "maxItems": t[1] + 1}),
        st.lists(inner, min_size=2, max_size=2).map(lambda options: {"anyOf": options}),
    ),
    max_leaves=5,
)
ROOTS = st.tuples(st.dictionaries(NAMES, SCHEMAS, min_size=1, max_size=3), SCHEMAS, st.booleans()).map(
    lambda t: {**_object({**t[0], "shared": {"$ref": "#/$defs/shared"}}), "$defs": {"shared": t[1]}} if t[2]
    else _object(t[0]))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=ROOTS, seed=st.integers(0, 2**31))
def test_random_schemas_always_validate(server, schema, seed):
    body = chat(server, response_format=schema_format(schema), max_tokens=600, seed=seed, temperature=1.0).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop", (schema, choice)
    assert_valid(choice["message"]["content"], schema)
