"""POST /v1/chat/completions and the model endpoints, driven like a user: the official
`openai` SDK (sync, async, streaming) and raw HTTP for SSE framing, against the real
daemon serving a generated tiny checkpoint."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import TINY_MODEL
from openai_schema import validate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def chat_body(**extra) -> dict:
    """A request body; with the SDK, pass it as **chat_body(...) (elmd's extras go in extra_body)."""
    body = {"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 8, **extra}
    if "ignore_eos" in body:  # not an SDK argument: the raw JSON field elmd (like vLLM) accepts
        body["extra_body"] = {"ignore_eos": body.pop("ignore_eos")}
    return body


def raw_body(**extra) -> dict:
    body = chat_body(**extra)
    extras = body.pop("extra_body", {})  # popped first: the raw body must not carry the SDK's `extra_body` key
    return {**body, **extras}


def prompt_tokens(server, messages) -> int:
    return httpx.post(f"{server.base_url}/tokenize", json={"messages": messages}).json()["count"]


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comment lines skipped)."""
    events = []
    for block in response.text.split("\n\n"):
        data = [line[len("data: "):] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append("\n".join(data))
    return events


def test_models_list_and_retrieve(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY_MODEL]
    raw = httpx.get(f"{server.v1}/models").json()
    validate(raw, "ListModelsResponse")
    assert raw["data"][0]["loaded"] is True
    assert client.models.retrieve(TINY_MODEL).id == TINY_MODEL
    missing = httpx.get(f"{server.v1}/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_health_reports_loaded_model(server):
    response = httpx.get(f"{server.base_url}/health")
    assert response.status_code == 200
    assert response.json()["loaded"] == [TINY_MODEL]


def test_chat_completion_shape_and_usage(server, client):
    completion = client.chat.completions.create(**chat_body(seed=3, ignore_eos=True))
    raw = httpx.post(f"{server.v1}/chat/completions", json=raw_body(seed=3, ignore_eos=True)).json()
    validate(raw, "CreateChatCompletionResponse")
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == prompt_tokens(server, MESSAGES)
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8
    assert raw["choices"][0]["message"]["content"] == choice.message.content  # same seed, same text
    # What the reply's bits depend on besides the request: backend, device, dtype, quant, kernels, model.
    engine = server.manager.loaded()[completion.model]
    assert completion.system_fingerprint == raw["system_fingerprint"] == engine.info.system_fingerprint


def test_same_seed_stream_equals_non_stream(client):
    body = chat_body(seed=11, temperature=0.9, top_p=0.95, max_tokens=24)
    whole = client.chat.completions.create(**body)
    stream = client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_framing(server):
    with httpx.stream("POST", f"{server.v1}/chat/completions",
                      json=raw_body(stream=True, seed=1, stream_options={"include_usage": True})) as response:
        response.read()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["object"] == "chat.completion.chunk"
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_stream_without_usage_has_no_usage_chunk(server):
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=raw_body(stream=True)) as response:
        response.read()
    chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)


def test_async_client_concurrent_requests(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        results = await asyncio.gather(*(client.chat.completions.create(**chat_body(seed=s)) for s in range(3)))
        stream = await client.chat.completions.create(**chat_body(seed=0), stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return results, streamed

    results, streamed = asyncio.run(main())
    assert [r.choices[0].message.content is not None for r in results] == [True] * 3
    assert streamed == results[0].choices[0].message.content


def test_n_choices(client):
    completion = client.chat.completions.create(**chat_body(n=3, seed=5, ignore_eos=True))
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert completion.usage.completion_tokens == 24
    assert len({c.message.content for c in completion.choices}) > 1  # seed + i per choice


def test_n_choices_stream(client):
    chunks = list(client.chat.completions.create(**chat_body(n=2, seed=5), stream=True))
    whole = client.chat.completions.create(**chat_body(n=2, seed=5))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == whole.choices[index].message.content


def test_stop_strings_and_finish_reasons(client):
    body = chat_body(seed=7, max_tokens=40, ignore_eos=True)
    full = client.chat.completions.create(**body).choices[0]
    assert full.finish_reason == "length"
    text = full.message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the generated text should have visible characters to stop at"
    for value in (stop, [stop, "never-generated-stop"]):
        stopped = client.chat.completions.create(**body, stop=value).choices[0]
        assert stopped.finish_reason == "stop"
        assert stopped.message.content == text[: text.index(stop)]


def test_chat_logprobs(client):
    completion = client.chat.completions.create(**chat_body(seed=2, logprobs=True, top_logprobs=3, ignore_eos=True))
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob <= 0 and token.bytes == list(token.token.encode()) or token.token.startswith("<0x")
        ranked = [t.logprob for t in token.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
    streamed = [t for c in client.chat.completions.create(**chat_body(seed=2, logprobs=True, top_logprobs=3,
                                                                     ignore_eos=True), stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    greedy = client.chat.completions.create(**chat_body(temperature=0, logprobs=True, top_logprobs=1))
    for token in greedy.choices[0].logprobs.content:
        assert token.token == token.top_logprobs[0].token and token.logprob == pytest.approx(token.top_logprobs[0].logprob)


def test_sampling_parameters_and_metadata_are_accepted_and_applied(client, server):
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]

    def create(**sampling):
        return client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": parts}], max_completion_tokens=6,
            user="someone", metadata={"k": "v"}, store=False, response_format={"type": "text"},
            extra_body={"ignore_eos": True, "keep_alive": "5m", **sampling.pop("extra", {})}, **sampling,
        )  # fmt: skip

    sampled = dict(temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, seed=1,
                   extra={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2})
    first, again = create(**sampled), create(**sampled)
    assert first.usage.completion_tokens == 6 and first.choices[0].finish_reason == "length"
    assert first.choices[0].message.content == again.choices[0].message.content  # the seed is applied
    # the parts are one message, one per line; top_k=1 is greedy whatever the temperature
    assert first.usage.prompt_tokens == prompt_tokens(server, [{"role": "user", "content": "Hi\nthere"}])
    greedy = create(temperature=0).choices[0].message.content
    assert create(temperature=1.5, seed=3, extra={"top_k": 1}).choices[0].message.content == greedy
    # penalties change the distribution: with a strong repetition penalty, greedy text differs
    assert create(temperature=0, extra={"repetition_penalty": 5.0}).choices[0].message.content != greedy


def test_greedy_is_deterministic(client):
    first = client.chat.completions.create(**chat_body(temperature=0))
    second = client.chat.completions.create(**chat_body(temperature=0))
    assert first.choices[0].message.content == second.choices[0].message.content
