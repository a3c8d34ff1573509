"""Limits on what one request may ask for (issue 6): each violation is a 400 in OpenAI's
error shape that names the parameter, and nothing is generated."""

from __future__ import annotations

import httpx
import pytest

from conftest import TINY_MODEL
from elmd.server.limits import (MAX_MESSAGES, MAX_N, MAX_PROMPTS, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES,
                                MAX_TOP_LOGPROBS)

USER = {"role": "user", "content": "Hi"}
CONTEXT = 2048  # the tiny fixture's max_context_length


def chat(server, **fields) -> httpx.Response:
    return httpx.post(f"{server.v1}/chat/completions", json={"model": TINY_MODEL, "messages": [USER], "max_tokens": 2,
                                                              **fields}, timeout=60)


def complete(server, **fields) -> httpx.Response:
    return httpx.post(f"{server.v1}/completions", json={"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 2, **fields},
                      timeout=60)


def assert_invalid(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("fields, param", [
    ({"messages": [USER] * (MAX_MESSAGES + 1)}, "messages"),
    ({"n": MAX_N + 1}, "n"),
    ({"n": 0}, "n"),
    ({"logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1}, "top_logprobs"),
    ({"stop": ["s"] * (MAX_STOP_SEQUENCES + 1)}, "stop"),
    ({"stop": "s" * (MAX_STOP_LENGTH + 1)}, "stop"),
    ({"stop": ["ok", "s" * (MAX_STOP_LENGTH + 1)]}, "stop"),
    ({"max_tokens": CONTEXT}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"max_completion_tokens": CONTEXT + 1}, "max_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}], "max_tokens": 1}, "messages"),
])
def test_chat_limits(server, fields, param):
    assert_invalid(chat(server, **fields), param)


@pytest.mark.parametrize("fields, param", [
    ({"prompt": ["Hi"] * (MAX_PROMPTS + 1)}, "prompt"),
    ({"prompt": [[1, 2]] * (MAX_PROMPTS + 1)}, "prompt"),
    ({"n": MAX_N + 1}, "n"),
    ({"logprobs": MAX_TOP_LOGPROBS + 1}, "logprobs"),
    ({"stop": ["s"] * (MAX_STOP_SEQUENCES + 1)}, "stop"),
    ({"max_tokens": CONTEXT}, "max_tokens"),
    ({"seed": -(2**63) - 1}, "seed"),
])
def test_completion_limits(server, fields, param):
    assert_invalid(complete(server, **fields), param)


def test_requests_at_the_limits_are_served(server):
    at_limits = chat(server, messages=[USER] * 4, n=MAX_N, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS,
                     stop=["s" * MAX_STOP_LENGTH] * MAX_STOP_SEQUENCES, seed=2**63 - 1, max_tokens=1)
    assert at_limits.status_code == 200, at_limits.text
    assert len(at_limits.json()["choices"]) == MAX_N
    batch = complete(server, prompt=["Hi"] * MAX_PROMPTS, max_tokens=1, seed=-(2**63))
    assert batch.status_code == 200, batch.text
    assert len(batch.json()["choices"]) == MAX_PROMPTS
    a_long_prompt_with_room = complete(server, prompt=[1] * (CONTEXT - 2), max_tokens=2)
    assert a_long_prompt_with_room.status_code == 200, a_long_prompt_with_room.text
