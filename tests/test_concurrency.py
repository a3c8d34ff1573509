"""Many clients at once, through the real daemon: seeded output independent of neighbours,
prefix reuse across chat turns reported in usage, and a storm of clients that disconnect
mid-stream leaving the daemon answering with its memory where it was."""

from __future__ import annotations

import asyncio
import gc

import httpx
import openai
import pytest
from conftest import TINY_MODEL

QUESTION = [{"role": "user", "content": "Tell me about rivers and the sea, in detail."}]


def _kv_bytes(server) -> int:
    """Bytes held by the KV cache and the prefix cache of the served model."""
    engine = server.manager.loaded()[TINY_MODEL]
    scheduler = engine.backend.scheduler
    cache = sum(b.attn.cache.k.nbytes + b.attn.cache.v.nbytes for b in engine.backend.model.transformer.layers)
    return cache + scheduler.prefix_cache.bytes


@pytest.fixture
def live(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, keep_alive=-1, max_concurrent_requests=8, prefix_cache_bytes=8 << 20)
    httpx.post(f"{server.v1}/chat/completions", json={"model": TINY_MODEL, "messages": QUESTION, "max_tokens": 1}, timeout=60)
    return server


def test_seeded_requests_give_the_same_text_alone_or_among_others(live):
    client = openai.OpenAI(base_url=live.v1, api_key="unused")
    prompts = [f"Story number {i} about a {w}" for i, w in enumerate(["cat", "ship", "moon", "bread", "storm", "violin"])]

    def ask(prompt: str, seed: int) -> str:
        return client.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=24, temperature=0.9, seed=seed).choices[0].text

    alone = [ask(p, seed) for seed, p in enumerate(prompts)]

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=live.v1, api_key="unused")
        replies = await asyncio.gather(
            *(aclient.completions.create(model=TINY_MODEL, prompt=p, max_tokens=24, temperature=0.9, seed=seed)
              for seed, p in enumerate(prompts))  # fmt: skip
        )
        return [r.choices[0].text for r in replies]

    assert asyncio.run(together()) == alone


def test_second_turn_reuses_the_history_and_reports_cached_tokens(live):
    client = openai.OpenAI(base_url=live.v1, api_key="unused")
    first = client.chat.completions.create(model=TINY_MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    turn2 = QUESTION + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Go on."},
    ]
    second = client.chat.completions.create(model=TINY_MODEL, messages=turn2, max_tokens=12, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_output_is_identical_with_and_without_the_prefix_cache(start_server, tiny_checkpoint):
    replies = []
    for cache in (8 << 20, 0):
        server = start_server(tiny_checkpoint, model_id=TINY_MODEL, keep_alive=-1, prefix_cache_bytes=cache)
        client = openai.OpenAI(base_url=server.v1, api_key="unused")
        first = client.chat.completions.create(model=TINY_MODEL, messages=QUESTION, max_tokens=10, temperature=0)
        turn2 = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "More."}]
        second = client.chat.completions.create(model=TINY_MODEL, messages=turn2, max_tokens=10, temperature=0)
        replies.append((first.choices[0].message.content, second.choices[0].message.content, second.usage.prompt_tokens_details.cached_tokens))
    (a1, a2, cached_on), (b1, b2, cached_off) = replies
    assert (a1, a2) == (b1, b2)
    assert cached_on > 0 and cached_off == 0


WALK_AWAY = {  # a long stream on each API, and how to count its events
    "/v1/completions": ({"model": TINY_MODEL, "prompt": "word " * 400, "max_tokens": 1500, "stream": True,
                         "ignore_eos": True}, "data: "),
    "/v1/responses": ({"model": TINY_MODEL, "input": "word " * 400, "max_output_tokens": 1500, "stream": True,
                       "ignore_eos": True}, "data: "),
    "/api/generate": ({"model": TINY_MODEL, "prompt": "word " * 400, "raw": True,
                       "options": {"num_predict": 1500, "seed": 1}}, "{"),
}


@pytest.mark.parametrize("path", WALK_AWAY)
def test_clients_disconnecting_mid_stream_free_their_memory_and_the_daemon_keeps_answering(live, path):
    baseline = _kv_bytes(live)
    body, event = WALK_AWAY[path]

    async def walk_away(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{live.base_url}{path}", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith(event)
                if seen >= 3:
                    return  # the client goes away mid-stream

    async def storm() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(walk_away(client) for _ in range(12)))

    asyncio.run(storm())
    scheduler = live.manager.loaded()[TINY_MODEL].backend.scheduler
    for _ in range(200):  # cancellations land within a step; give the worker a moment
        if not scheduler.running and not scheduler.waiting:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not scheduler.running and not scheduler.waiting
    assert sorted(scheduler.free) == list(range(8))
    reply = httpx.post(f"{live.v1}/chat/completions", json={"model": TINY_MODEL, "messages": QUESTION, "max_tokens": 4}, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    gc.collect()
    # The KV cache is back to its idle size; only the bounded prefix cache may have grown.
    assert _kv_bytes(live) <= baseline + (8 << 20)
