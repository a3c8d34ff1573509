"""POST /v1/completions: every prompt form, echo + logprobs checked against the engine's
own log-probabilities, scoring without generating, and the requests lm-evaluation-harness's
`local-completions` model sends."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import TINY_MODEL
from openai_schema import validate


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(server):
    return server.manager.loaded()[TINY_MODEL]


def post(server, **body) -> httpx.Response:
    return httpx.post(f"{server.v1}/completions", json={"model": TINY_MODEL, **body}, timeout=60)


def engine_scores(engine, ids, top_n):
    return asyncio.run(asyncio.to_thread(engine.score, ids, top_n))


def test_string_prompt(server, client):
    completion = client.completions.create(model=TINY_MODEL, prompt="Once upon a time", max_tokens=6, seed=1,
                                           extra_body={"ignore_eos": True})
    raw = post(server, prompt="Once upon a time", max_tokens=6, seed=1, ignore_eos=True).json()
    validate(raw, "CreateCompletionResponse")
    assert raw["choices"][0]["text"] == completion.choices[0].text
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 6
    ids = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    assert completion.usage.prompt_tokens == len(ids)


def test_prompt_forms_and_choice_indexes(server, engine):
    text_a, text_b = "Hello world", "The sky is"
    ids_a, ids_b = engine.tokenizer.encode(text_a), engine.tokenizer.encode(text_b)
    forms = {"list of strings": [text_a, text_b], "token ids": ids_a, "list of token lists": [ids_a, ids_b]}
    for name, prompt in forms.items():
        body = post(server, prompt=prompt, max_tokens=3, n=2, seed=4, echo=True).json()
        prompts = 1 if name == "token ids" else 2
        assert [c["index"] for c in body["choices"]] == list(range(2 * prompts)), name
        assert body["choices"][0]["text"].startswith(engine.tokenizer.decode(ids_a)), name
        assert body["usage"]["prompt_tokens"] == len(ids_a) + (len(ids_b) if prompts == 2 else 0), name
    # text and token-id prompts are the same prompt
    as_text = post(server, prompt=text_a, max_tokens=5, seed=9).json()["choices"][0]["text"]
    as_ids = post(server, prompt=ids_a, max_tokens=5, seed=9).json()["choices"][0]["text"]
    assert as_text == as_ids


def test_echo_logprobs_match_the_engine_without_generating(server, engine):
    prompt = "The capital of France is Paris"
    body = post(server, prompt=prompt, max_tokens=0, echo=True, logprobs=2).json()
    validate(body, "CreateCompletionResponse")
    choice = body["choices"][0]
    ids = engine.tokenizer.encode(prompt)
    expected = engine_scores(engine, ids, 2)
    logprobs = choice["logprobs"]
    assert choice["text"] == prompt and body["usage"]["completion_tokens"] == 0
    assert logprobs["tokens"] == [engine.tokenizer.token_text(t) for t in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    for top, exp in zip(logprobs["top_logprobs"][1:], expected):
        assert top == pytest.approx({engine.tokenizer.token_text(t): l for t, l in exp.top}, abs=1e-5)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] < len(prompt)
    assert prompt[offsets[-1]:] == engine.tokenizer.decode(ids[-1:]).lstrip() or prompt.endswith(logprobs["tokens"][-1])


def test_lm_eval_loglikelihood_request(server, engine):
    """What lm-evaluation-harness sends for a log-likelihood: token lists, echo, logprobs 1,
    max_tokens 1, temperature 0; it sums token_logprobs[ctxlen:-1] and compares each with
    max(top_logprobs) to decide greediness."""
    context, continuation = engine.tokenizer.encode("Question: 2+2? Answer:"), engine.tokenizer.encode(" four", add_bos=False)
    request = {"prompt": [context + continuation], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234}
    choice = post(server, **request).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(context) + len(continuation) + 1
    expected = engine_scores(engine, context + continuation, 1)
    got = logprobs["token_logprobs"][len(context):-1]
    assert got == pytest.approx([e.logprob for e in expected[len(context) - 1:]], abs=1e-5)
    for token_logprob, top in zip(got, logprobs["top_logprobs"][len(context):-1]):
        assert max(top.values()) >= token_logprob - 1e-6
    greedy_next = max(logprobs["top_logprobs"][-1], key=logprobs["top_logprobs"][-1].get)
    assert logprobs["tokens"][-1] == greedy_next  # temperature 0 takes the top token


def test_echo_with_generation(server):
    body = post(server, prompt="Hello", max_tokens=4, echo=True, logprobs=0, seed=2, n=2, ignore_eos=True).json()
    for choice in body["choices"]:
        assert choice["text"].startswith("Hello")
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"])
        assert len(logprobs["tokens"]) == body["usage"]["prompt_tokens"] + 4  # the prompt counts once for n choices
        assert logprobs["top_logprobs"][-1] == {}


def test_stream_equals_non_stream(server, client):
    args = dict(model=TINY_MODEL, prompt=["Hello", "World"], max_tokens=10, seed=6, n=2)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    for choice in whole.choices:
        streamed = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == choice.index)
        assert streamed == choice.text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", f"{server.v1}/completions",
                      json={"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True, "echo": True}) as response:
        events = [line[6:] for line in response.read().decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        validate(json.loads(event), "CreateCompletionResponse", streamed=True)
    assert json.loads(events[0])["choices"][0]["text"] == "Hi"


def test_stop_and_length(server):
    full = post(server, prompt="Once", max_tokens=30, seed=8, ignore_eos=True).json()["choices"][0]
    assert full["finish_reason"] == "length"
    stop = full["text"][10:12]
    stopped = post(server, prompt="Once", max_tokens=30, seed=8, ignore_eos=True, stop=[stop]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == full["text"][: full["text"].index(stop)]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": [1, 99999]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logprobs": "5"}, "logprobs"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x" * 3000 * 4, "max_tokens": 1}, "prompt"),
    ],
)
def test_invalid_requests_name_the_parameter(server, body, param):
    response = post(server, **body)
    assert response.status_code == 400, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param
