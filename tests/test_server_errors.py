"""Every failure in OpenAI's error shape with the right status and the offending parameter."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import TINY_MODEL
from openai_schema import validate

USER = [{"role": "user", "content": "Hi"}]


def chat(server, body, raw=False) -> httpx.Response:
    url = f"{server.v1}/chat/completions"
    if raw:
        return httpx.post(url, content=body, headers={"content-type": "application/json"})
    return httpx.post(url, json=body)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    assert "Traceback" not in response.text
    return body["error"]


def test_malformed_json_is_400(server):
    error = assert_error(chat(server, b'{"model": "x", "messages": [', raw=True), 400, code="invalid_json")
    assert error["type"] == "invalid_request_error"
    assert_error(chat(server, b"[1, 2]", raw=True), 400)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 2.5}, "n"),
        ({"n": True}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stop": 5}, "stop"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"keep_alive": "soon"}, "keep_alive"),
    ],
)
def test_wrong_types_and_values_name_the_parameter(server, extra, param):
    assert_error(chat(server, {"model": TINY_MODEL, "messages": USER, "max_tokens": 2, **extra}), 400, param=param)


def test_an_integer_written_with_a_zero_fraction_is_an_integer(server):
    """JSON Schema's `integer` (and so openapi.json) admits 2.0; a client generated from it may send that."""
    reply = chat(server, {"model": TINY_MODEL, "messages": USER, "max_tokens": 2.0, "n": 2.0, "seed": 7.0})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 2 and reply.json()["usage"]["completion_tokens"] <= 4


def test_missing_model_is_400(server):
    assert_error(chat(server, {"messages": USER}), 400, param="model", code="missing_required_parameter")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "tool_call_id": "c", "content": "x", "function_call": {"name": "f"}}]},
         "messages[0].function_call"),  # was ignored on a tool result (found by schemathesis)
    ],
)
def test_unsupported_features_are_refused_by_name(server, extra, param):
    error = assert_error(chat(server, {"model": TINY_MODEL, "messages": USER, **extra}), 400, param=param,
                         code="unsupported_parameter")
    assert param in error["message"]


def test_unknown_model_is_404(server):
    for model in ("no-such-model", "../../etc/passwd", "/tmp", "UPPER"):
        assert_error(chat(server, {"model": model, "messages": USER}), 404, param="model", code="model_not_found")
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=USER)


def test_context_length_exceeded(server):
    long = [{"role": "user", "content": "word " * 3000}]
    assert_error(chat(server, {"model": TINY_MODEL, "messages": long, "max_tokens": 1}), 400,
                 param="messages", code="context_length_exceeded")
    assert_error(chat(server, {"model": TINY_MODEL, "messages": USER, "max_tokens": 5000}), 400,
                 code="context_length_exceeded")
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=TINY_MODEL, messages=USER, max_tokens=5000)
    assert excinfo.value.code == "context_length_exceeded"


def test_unknown_route_and_method(server):
    assert_error(httpx.get(f"{server.v1}/nothing-here"), 404)
    assert_error(httpx.get(f"{server.v1}/chat/completions"), 405)


def test_405_allows_every_method_of_the_path(server):
    response = httpx.request("OPTIONS", f"{server.v1}/responses/resp_x")
    assert_error(response, 405)
    assert response.headers["allow"] == "DELETE, GET"
    assert httpx.put(f"{server.base_url}/api/delete").json() == {"error": "Method Not Allowed"}


def test_openapi_lists_the_statuses_each_route_answers(server):
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in operations)
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "429", "503"} <= set(chat)
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    show = schema["paths"]["/api/show"]["post"]["responses"]
    assert show["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OllamaError")
    assert schema["components"]["schemas"]["ResponsesRequest"]["additionalProperties"] is False


def test_a_keep_alive_longer_than_any_date_reads_as_forever(server):
    """/api/ps answered 500 once a request had kept the model for 1e300 seconds (found by schemathesis)."""
    load = f"{server.base_url}/api/generate"
    try:
        for endless in (1e300, "1e999"):  # the string is infinite as a float
            assert httpx.post(load, json={"model": TINY_MODEL, "stream": False, "keep_alive": endless}).status_code == 200
            ps = httpx.get(f"{server.base_url}/api/ps")
            assert ps.status_code == 200 and int(ps.json()["models"][0]["expires_at"][:4]) > 2300
    finally:
        httpx.post(load, json={"model": TINY_MODEL, "stream": False, "keep_alive": -1})
    for undocumented in ("inf", "nan", "1_000"):  # float() reads them; the schema's pattern does not
        refused = httpx.post(load, json={"model": TINY_MODEL, "stream": False, "keep_alive": undocumented})
        assert refused.status_code == 400 and "keep_alive" in refused.json()["error"]
