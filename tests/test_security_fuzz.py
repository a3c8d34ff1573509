"""Fuzzing the live daemon (issue 6): hypothesis throws malformed JSON, wrong types,
extreme numbers, huge strings (within the body limit) and random nested structures at
every endpoint. No answer may be a 500 (in the status or in a stream's error event), no
request may hang, and a well-formed request is still served afterwards.

The fuzzed daemon serves the tiny checkpoint with its context cut to 64 tokens, so any
request that happens to be valid generates at most 64 tokens and the run stays short."""

from __future__ import annotations

import json
import math
import string

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import build_app, serve_app

MODEL = "fuzz-openelm"
BODY_LIMIT = 256 << 10
TIMEOUT = httpx.Timeout(30.0)  # a request that takes longer counts as a hang
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from elmd.fixtures import write_checkpoint

    checkpoint = write_checkpoint(tmp_path_factory.mktemp("fuzz") / MODEL, shape="tiny", seed=1)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "max_context_length": 64}))
    app, manager = build_app(checkpoint, model_id=MODEL, keep_alive=-1, max_body_bytes=BODY_LIMIT)
    with serve_app(app, manager) as running:
        with httpx.Client(base_url=running.base_url, timeout=TIMEOUT) as client:
            assert client.get("/health").status_code in (200, 503)
            yield client


# ------------------------------------------------------------------ strategies

EXTREME_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30),
                                   0.0, -0.0, 1e-320, 5e-324, 1e308, -1e308, math.inf, -math.inf, math.nan, 0.5, 2.0000001])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), EXTREME_NUMBERS,
                    st.text(max_size=40), st.sampled_from(["", "5m", "-1", "1h30m", "text", "none", "auto", MODEL]))
HUGE_TEXT = st.integers(min_value=1, max_value=BODY_LIMIT - 2048).map(lambda n: "x" * n) | st.text(min_size=200,
                                                                                                  max_size=4000)
JSON = st.recursive(SCALARS | HUGE_TEXT, lambda inner: st.lists(inner, max_size=6) |
                    st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=25)
ROLES = st.sampled_from(["user", "system", "assistant", "developer", "tool", "function", "", "USER", "root"])
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", ""])},
                             optional={"text": st.one_of(st.text(max_size=60), JSON), "image_url": JSON})
MESSAGE = st.fixed_dictionaries({"role": ROLES | JSON}, optional={
    "content": st.one_of(st.text(max_size=200), st.lists(PART, max_size=4), JSON),
    "name": JSON, "tool_calls": JSON, "tool_call_id": JSON, "function_call": JSON})
MESSAGES = st.lists(MESSAGE, max_size=8) | JSON
TOKEN_IDS = st.lists(st.integers(min_value=-5, max_value=1100) | EXTREME_NUMBERS, max_size=80)


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly values of the right type and range (extreme but valid ones included), so
    that many requests get as far as the engine; sometimes anything at all."""
    return st.one_of(plausible, plausible, plausible, EXTREME_NUMBERS, JSON)


SHARED_FIELDS = {
    "model": field(st.sampled_from([MODEL, MODEL, "", "../" + MODEL, "/etc/passwd", "apple/OpenELM-270M-Instruct"])),
    "max_tokens": field(st.integers(min_value=0, max_value=70)),
    "temperature": field(st.floats(min_value=0, max_value=2)),
    "top_p": field(st.floats(min_value=0, max_value=1)),
    "top_k": field(st.integers(min_value=0, max_value=10**6)),
    "min_p": field(st.floats(min_value=0, max_value=1)),
    "n": field(st.integers(min_value=1, max_value=16)),
    "stop": field(st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20)),
    "seed": field(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    "presence_penalty": field(st.floats(min_value=-2, max_value=2)),
    "frequency_penalty": field(st.floats(min_value=-2, max_value=2)),
    "repetition_penalty": field(st.floats(min_value=1e-6, max_value=1e300)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "keep_alive": field(st.sampled_from(["-1", -1, "10m", 600, "1h30m", 1e300])),
    "ignore_eos": field(st.booleans()),
    "logit_bias": field(st.dictionaries(st.text(max_size=5), st.integers(-100, 100), max_size=3)),
    "user": field(st.text(max_size=30)),
    "metadata": field(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
    "unknown_extra": JSON,
}
CHAT_FIELDS = {**SHARED_FIELDS, "messages": field(st.lists(MESSAGE, min_size=1, max_size=8)),
               "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(min_value=0, max_value=20)),
               "max_completion_tokens": field(st.integers(min_value=1, max_value=70)),
               "response_format": field(st.just({"type": "text"})), "tools": JSON, "tool_choice": JSON,
               "modalities": field(st.just(["text"]))}
COMPLETION_FIELDS = {**SHARED_FIELDS,
                     "prompt": field(st.text(max_size=300) | TOKEN_IDS | st.lists(TOKEN_IDS, max_size=4) |
                                     st.lists(st.text(max_size=30), max_size=4)),
                     "echo": field(st.booleans()), "logprobs": field(st.integers(min_value=0, max_value=20)),
                     "best_of": field(st.integers(min_value=1, max_value=4)), "suffix": JSON}
VALID_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
VALID_COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 8}


def mutations(valid: dict, fields: dict) -> st.SearchStrategy:
    """A valid body with one to three fields replaced or added, and maybe one removed."""
    names = sorted(fields)
    changes = st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({name: fields[name] for name in chosen}))
    dropped = st.sets(st.sampled_from(sorted(valid)), max_size=1)
    return st.builds(lambda c, d: {k: v for k, v in {**valid, **c}.items() if k not in d}, changes, dropped)


def assert_handled(response: httpx.Response) -> None:
    is_json = response.headers.get("content-type", "") == "application/json"
    error = response.json()["error"] if response.status_code >= 400 and is_json else None
    code = error["code"] if isinstance(error, dict) else error  # Ollama's routes: the message itself
    event(f"{response.status_code} {code or ''}")  # pytest --hypothesis-show-statistics: what the fuzzer reached
    assert response.status_code < 500, response.text[:2000]
    assert "internal_error" not in response.text, response.text[:2000]
    assert "The server had an error" not in response.text, response.text[:2000]


def post(client: httpx.Client, path: str, body) -> httpx.Response:
    return client.post(path, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"})


def still_serving(client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json=VALID_CHAT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"


# ------------------------------------------------------------------ tests


@FUZZ
@given(body=st.one_of(mutations(VALID_CHAT, CHAT_FIELDS), mutations(VALID_CHAT, CHAT_FIELDS), JSON))
def test_chat_completions_never_fail_or_hang(fuzz_server, body):
    assert_handled(post(fuzz_server, "/v1/chat/completions", body))


@FUZZ
@given(body=st.one_of(mutations(VALID_COMPLETION, COMPLETION_FIELDS), mutations(VALID_COMPLETION, COMPLETION_FIELDS), JSON))
def test_completions_never_fail_or_hang(fuzz_server, body):
    assert_handled(post(fuzz_server, "/v1/completions", body))


@settings(FUZZ, max_examples=80)
@given(path=st.sampled_from(["/tokenize", "/detokenize"]),
       body=st.fixed_dictionaries({}, optional={"model": SHARED_FIELDS["model"], "prompt": st.text(max_size=300) | JSON,
                                                "messages": MESSAGES, "tokens": TOKEN_IDS | JSON,
                                                "add_special_tokens": JSON, "add_generation_prompt": JSON,
                                                "return_token_strs": JSON}) | JSON)
def test_tokenizer_endpoints_never_fail_or_hang(fuzz_server, path, body):
    assert_handled(post(fuzz_server, path, body))


ITEM = st.fixed_dictionaries({"role": ROLES | JSON}, optional={
    "type": st.sampled_from(["message", "function_call_output", "reasoning", ""]) | JSON,
    "content": st.one_of(st.text(max_size=200), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["input_text", "output_text", "input_image", ""])},
        optional={"text": st.one_of(st.text(max_size=60), JSON)}), max_size=4), JSON)})
RESPONSES_FIELDS = {**{k: SHARED_FIELDS[k] for k in ("model", "temperature", "top_p", "stream", "seed", "stop",
                                                      "keep_alive", "metadata", "unknown_extra")},
                    "input": field(st.text(max_size=300) | st.lists(ITEM, max_size=6)),
                    "instructions": field(st.text(max_size=100)),
                    "max_output_tokens": field(st.integers(min_value=1, max_value=70)),
                    "previous_response_id": field(st.sampled_from(["resp_x", ""])), "store": field(st.booleans()),
                    "text": field(st.just({"format": {"type": "text"}})), "tools": JSON, "tool_choice": JSON,
                    "reasoning": JSON, "include": JSON, "truncation": JSON}
VALID_RESPONSE = {"model": MODEL, "input": "Hello", "max_output_tokens": 8}
OPTIONS = st.fixed_dictionaries({}, optional={
    "num_predict": field(st.integers(min_value=-2, max_value=70)), "temperature": SHARED_FIELDS["temperature"],
    "top_p": SHARED_FIELDS["top_p"], "top_k": SHARED_FIELDS["top_k"], "min_p": SHARED_FIELDS["min_p"],
    "repeat_penalty": SHARED_FIELDS["repetition_penalty"], "seed": SHARED_FIELDS["seed"],
    "stop": field(st.lists(st.text(max_size=5), max_size=20)), "num_ctx": field(st.integers(1, 10**6)),
    "mirostat": JSON, "num_thread": JSON, "unknown": JSON})
OLLAMA_FIELDS = {"model": SHARED_FIELDS["model"], "stream": SHARED_FIELDS["stream"], "keep_alive": SHARED_FIELDS["keep_alive"],
                 "options": field(OPTIONS), "format": JSON, "think": JSON, "images": JSON, "system": JSON, "raw": JSON,
                 "messages": field(st.lists(MESSAGE, max_size=8)), "prompt": field(st.text(max_size=300)),
                 "unknown_extra": JSON}
VALID_OLLAMA_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "options": {"num_predict": 8}}
VALID_OLLAMA_GENERATE = {"model": MODEL, "prompt": "Hello", "options": {"num_predict": 8}}


@FUZZ
@given(body=st.one_of(mutations(VALID_RESPONSE, RESPONSES_FIELDS), mutations(VALID_RESPONSE, RESPONSES_FIELDS), JSON))
def test_responses_never_fail_or_hang(fuzz_server, body):
    assert_handled(post(fuzz_server, "/v1/responses", body))


@FUZZ
@given(path_body=st.one_of(
    st.tuples(st.just("/api/chat"), mutations(VALID_OLLAMA_CHAT, OLLAMA_FIELDS)),
    st.tuples(st.just("/api/generate"), mutations(VALID_OLLAMA_GENERATE, OLLAMA_FIELDS)),
    st.tuples(st.sampled_from(["/api/chat", "/api/generate", "/api/show"]), JSON)))
def test_ollama_routes_never_fail_or_hang(fuzz_server, path_body):
    path, body = path_body
    assert_handled(post(fuzz_server, path, body))


PATHS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/responses", "/api/chat",
         "/api/generate"]
VALID_TEXT = json.dumps(VALID_CHAT)


@settings(FUZZ, max_examples=80)
@given(path=st.sampled_from(PATHS),
       raw=st.binary(max_size=400) |
       st.tuples(st.integers(0, len(VALID_TEXT)), st.text(string.printable, max_size=3)).map(
           lambda cut: VALID_TEXT[: cut[0]] + cut[1] + VALID_TEXT[cut[0]:]) |
       st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth) |
       st.integers(1, 3000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "",
                                     "application/json; charset=latin-1", "multipart/form-data; boundary=x"]))
def test_malformed_bodies_never_fail_or_hang(fuzz_server, path, raw, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert_handled(fuzz_server.post(path, content=raw.encode() if isinstance(raw, str) else raw, headers=headers))


@pytest.mark.parametrize("extreme", [{"temperature": 5e-324}, {"temperature": 1e-320}, {"repetition_penalty": 1e-300},
                                     {"temperature": 1e-300, "repetition_penalty": 1e300}, {"top_p": 5e-324},
                                     {"top_k": 10**6, "min_p": 1.0}, {"seed": -(2**63), "n": 16}])
def test_extreme_but_legal_sampling_values_are_served(fuzz_server, extreme):
    """Found by the fuzzer: float32 logits overflowed to inf, softmax gave NaN, 500."""
    for path, body in (("/v1/completions", VALID_COMPLETION), ("/v1/chat/completions", VALID_CHAT)):
        response = post(fuzz_server, path, {**body, **extreme})
        assert response.status_code == 200, response.text


def test_the_daemon_still_serves_after_fuzzing(fuzz_server):
    still_serving(fuzz_server)
    assert fuzz_server.get("/health").json()["status"] == "ok"
