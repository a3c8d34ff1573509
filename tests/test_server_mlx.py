"""The same API requests served by the MLX backend (`--backend mlx`; MLX's Linux CPU
build off the Mac). MLX on CPU is slow, so a few tokens each."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import TINY_MODEL, build_app, serve_app
from openai_schema import validate

pytest.importorskip("mlx.core")
pytestmark = pytest.mark.mlx

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def mlx_server(tiny_checkpoint):
    app, manager = build_app(tiny_checkpoint, backend="mlx", keep_alive=-1)
    with serve_app(app, manager) as running:
        running.wait_healthy(120, what="the MLX model")
        yield running


def test_models_report_the_mlx_backend(mlx_server):
    card = httpx.get(f"{mlx_server.v1}/models/{TINY_MODEL}").json()
    assert card["loaded"] and card["backend"] == "mlx"
    health = httpx.get(f"{mlx_server.base_url}/health").json()
    assert health["cpu_kernels"] is None  # no PyTorch CPU model is loaded


def test_chat_stream_equals_non_stream(mlx_server):
    client = openai.OpenAI(base_url=mlx_server.v1, api_key="unused", max_retries=0)
    body = dict(model=TINY_MODEL, messages=USER, max_tokens=4, seed=3, temperature=0.8)
    whole = client.chat.completions.create(**body)
    raw = httpx.post(f"{mlx_server.v1}/chat/completions", json=body, timeout=120).json()
    validate(raw, "CreateChatCompletionResponse")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                       if c.choices)
    assert streamed == whole.choices[0].message.content
    fingerprint = mlx_server.manager.loaded()[TINY_MODEL].info.system_fingerprint
    assert whole.system_fingerprint == raw["system_fingerprint"] == fingerprint and fingerprint.startswith("fp_")


def test_completions_echo_logprobs(mlx_server):
    engine = mlx_server.manager.loaded()[TINY_MODEL]
    body = {"model": TINY_MODEL, "prompt": "Hello world", "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    response = httpx.post(f"{mlx_server.v1}/completions", json=body, timeout=120).json()
    validate(response, "CreateCompletionResponse")
    logprobs = response["choices"][0]["logprobs"]
    ids = engine.tokenizer.encode("Hello world")
    expected = [s.logprob for s in engine.score(ids, 1)]
    assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert len(logprobs["tokens"]) == len(ids) + 1


def test_errors_are_the_same(mlx_server):
    response = httpx.post(f"{mlx_server.v1}/chat/completions",
                          json={"model": TINY_MODEL, "messages": USER, "max_tokens": 5000}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    with httpx.stream("POST", f"{mlx_server.v1}/chat/completions", timeout=120,
                      json={"model": TINY_MODEL, "messages": USER, "max_tokens": 2, "stream": True}) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"


def test_metrics_read_the_mlx_backend(mlx_server):
    from test_metrics import scrape, value

    before = value(scrape(mlx_server.base_url), "elmd_generation_tokens_total", model=TINY_MODEL)
    usage = openai.OpenAI(base_url=mlx_server.v1, api_key="unused", max_retries=0).chat.completions.create(
        model=TINY_MODEL, messages=USER, max_tokens=3).usage
    samples = scrape(mlx_server.base_url)
    assert value(samples, "elmd_generation_tokens_total", model=TINY_MODEL) - before == usage.completion_tokens
    assert value(samples, "elmd_model_memory_bytes", model=TINY_MODEL) > 0
    assert ("elmd_kv_cache_bytes", (("model", TINY_MODEL),)) in samples  # MLX's batch cache (0 when idle)
    assert value(samples, "elmd_prefix_cache_bytes", model=TINY_MODEL) > 0  # the finished request's keys and values


def test_a_chat_s_next_turn_reports_its_cached_tokens(mlx_server):
    client = openai.OpenAI(base_url=mlx_server.v1, api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "Tell me about the sea and the sky, at length."}]
    first = client.chat.completions.create(model=TINY_MODEL, messages=question, max_tokens=8, temperature=0)
    history = question + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "And more?"}]
    second = client.chat.completions.create(model=TINY_MODEL, messages=history, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_constrained_output_and_logit_bias(mlx_server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "bc"]}},
              "required": ["ok", "tag"], "additionalProperties": False}
    body = {"model": TINY_MODEL, "messages": USER, "max_tokens": 30, "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}
    reply = httpx.post(f"{mlx_server.v1}/chat/completions", json=body, timeout=120).json()
    validate(reply, "CreateChatCompletionResponse")
    assert reply["choices"][0]["finish_reason"] == "stop"
    value = json.loads(reply["choices"][0]["message"]["content"])
    assert isinstance(value["ok"], bool) and value["tag"] in ("a", "bc") and set(value) == {"ok", "tag"}
    engine = mlx_server.manager.loaded()[TINY_MODEL]
    forced = httpx.post(f"{mlx_server.v1}/completions", timeout=120, json={
        "model": TINY_MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 1.0, "logprobs": 0,
        "logit_bias": {"300": 100}}).json()
    assert forced["choices"][0]["logprobs"]["tokens"] == [engine.tokenizer.token_text(300)] * 3
