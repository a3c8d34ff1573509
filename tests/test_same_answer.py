"""Same request, same answer (issue #30), through HTTP as a user meets it: each prompt sent
five ways gives one reply, greedy and seeded.

- cold: a daemon whose prefix cache is off, so every prompt is computed whole;
- after a request holding the first 60% of it (the rest computed after a prefix-cache hit);
- the same request again (all of it from the prefix cache);
- streamed;
- while 7 other requests generate beside it (batched decode steps, prompts chunked beside others).

The replies must be equal as text and token for token with equal logprobs (the logits are
bitwise the same), on the offline model at its
defaults (int4, the native CPU kernels once built) and on the OpenELM fixture at int8, bf16
and float32. The
fingerprint of both daemons must be the same: it names what the answer depends on."""

from __future__ import annotations

import concurrent.futures
import json
import shutil

import httpx
import pytest
from live_daemon import Daemon, offline_daemon, running_daemon, wait_for_cpu_kernels

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

PROMPTS = [
    "What is the difference between a lake and a pond?",
    "Name three colors.",
    "Write a haiku about autumn leaves falling.",
    "Explain why the sky is blue in two sentences.",
    "Give me a tip for sleeping better at night.",
    "What is the capital of France, and what is it known for?",
]
BESIDE = [f"Tell me a short story about a {animal}." for animal in
          ("cat", "dog", "fox", "owl", "bear", "horse", "whale")]
MAX_TOKENS = 32
SAMPLINGS = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.8, "seed": 11}}


def chat(daemon: Daemon, content: str, sampling: dict, max_tokens: int = MAX_TOKENS) -> dict:
    body = {"model": daemon.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "logprobs": True, **sampling}
    reply = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=300).raise_for_status().json()
    tokens = [(t["token"], t["logprob"]) for t in reply["choices"][0]["logprobs"]["content"]]
    return {"text": reply["choices"][0]["message"]["content"], "tokens": tokens,
            "fingerprint": reply["system_fingerprint"]}


def streamed(daemon: Daemon, content: str, sampling: dict) -> dict:
    body = {"model": daemon.model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "logprobs": True, "stream": True, **sampling}
    text, tokens, fingerprint = [], [], None
    with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.raise_for_status().iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            fingerprint = chunk["system_fingerprint"]
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
                tokens += [(t["token"], t["logprob"]) for t in (choice.get("logprobs") or {}).get("content") or []]
    return {"text": "".join(text), "tokens": tokens, "fingerprint": fingerprint}


def beside_others(daemon: Daemon, content: str, sampling: dict) -> dict:
    """The reply while 7 longer requests generate: it shares their decode steps."""
    with concurrent.futures.ThreadPoolExecutor(len(BESIDE) + 1) as pool:
        others = [pool.submit(chat, daemon, other, {"temperature": 0.7}, 3 * MAX_TOKENS) for other in BESIDE]
        ours = pool.submit(chat, daemon, content, sampling)
        for other in others:
            other.result()
        return ours.result()


def five_ways(cold: Daemon, cached: Daemon, sampling: dict) -> list[str]:
    """Every prompt whose five replies are not one, with what differed."""
    differing = []
    for prompt in PROMPTS:
        replies = {"cold": chat(cold, prompt, sampling)}
        chat(cached, prompt[: int(len(prompt) * 0.6)], sampling)  # the first 60% of it, cached
        replies["after 60%"] = chat(cached, prompt, sampling)
        replies["again"] = chat(cached, prompt, sampling)
        replies["streamed"] = streamed(cached, prompt, sampling)
        replies["beside 7"] = beside_others(cached, prompt, sampling)
        if any(reply != replies["cold"] for reply in replies.values()):
            differing.append(f"{prompt!r}: " + "; ".join(f"{way}: {reply['text']!r} {reply['fingerprint']}"
                                                         for way, reply in replies.items()))
    return differing


@pytest.fixture(scope="module")
def offline_pair(tmp_path_factory):
    """The offline model twice on one home: without a prefix cache (cold), then with one."""
    root = tmp_path_factory.mktemp("same-answer-offline")
    with offline_daemon(root, ELMD_PREFIX_CACHE_BYTES="0") as cold:
        with offline_daemon(root, ELMD_PREFIX_CACHE_BYTES=str(256 << 20)) as cached:
            yield cold, cached


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_the_offline_model_gives_one_reply_five_ways(offline_pair, sampling):
    assert five_ways(*offline_pair, sampling) == []


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
@pytest.mark.parametrize("quant", ["int8", "bf16", "none"])
def test_the_openelm_fixture_gives_one_reply_five_ways(tiny_checkpoint, tmp_path, quant, sampling):
    # A copy: a daemon stores the quantized weights beside the checkpoint, which the session shares.
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / tiny_checkpoint.name)
    with running_daemon(checkpoint, tmp_path / "cold", ELMD_QUANT=quant, ELMD_PREFIX_CACHE_BYTES="0") as cold:
        with running_daemon(checkpoint, tmp_path / "cached", ELMD_QUANT=quant) as cached:
            wait_for_cpu_kernels(cold)
            wait_for_cpu_kernels(cached)
            assert five_ways(cold, cached, sampling) == []
