"""/tokenize, /detokenize, /tokenizer_info as lm-evaluation-harness's remote tokenizer
uses them: it checks `eos_token` in /tokenizer_info, tokenizes special tokens' text with
`add_special_tokens: false` to find their ids, and reads `tokens` / `prompt`."""

from __future__ import annotations

import httpx
import pytest
from conftest import TINY_MODEL


@pytest.fixture(scope="module")
def engine(server):
    return server.manager.loaded()[TINY_MODEL]


def test_tokenizer_info(server, engine):
    info = httpx.get(f"{server.base_url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    assert info["model_max_length"] == engine.context_length
    assert "<|assistant|>" in info["chat_template"]
    assert httpx.get(f"{server.base_url}/tokenizer_info", params={"model": TINY_MODEL}).json() == info
    assert httpx.get(f"{server.base_url}/tokenizer_info", params={"model": "nope"}).status_code == 404


def test_remote_tokenizer_round_trip(server, engine):
    tokenize = lambda **body: httpx.post(f"{server.base_url}/tokenize", json=body).json()  # noqa: E731
    info = httpx.get(f"{server.base_url}/tokenizer_info").json()
    assert tokenize(prompt=info["eos_token"], add_special_tokens=False)["tokens"][0] in engine.tokenizer.eos_ids
    assert tokenize(prompt=info["bos_token"], add_special_tokens=False)["tokens"][0] == engine.tokenizer.bos_id
    text = "Hello world, how are you?"
    plain = tokenize(prompt=text, add_special_tokens=False)
    with_bos = tokenize(prompt=text)
    assert with_bos["tokens"] == [engine.tokenizer.bos_id, *plain["tokens"]]
    assert plain["tokens"] == engine.tokenizer.encode(text, add_bos=False)
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == engine.context_length
    detok = httpx.post(f"{server.base_url}/detokenize", json={"tokens": plain["tokens"]}).json()
    assert detok["prompt"] == text
    strs = tokenize(prompt=text, return_token_strs=True)["token_strs"]
    assert strs == [engine.tokenizer.token_text(t) for t in with_bos["tokens"]]


def test_tokenize_messages_matches_chat_prompt(server):
    messages = [{"role": "user", "content": "Hi there"}]
    count = httpx.post(f"{server.base_url}/tokenize", json={"messages": messages}).json()["count"]
    chat = httpx.post(f"{server.v1}/chat/completions", json={"model": TINY_MODEL, "messages": messages, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == count


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_tokenizer_errors(server, path, body, param):
    response = httpx.post(f"{server.base_url}{path}", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
