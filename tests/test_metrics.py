"""GET /metrics after real traffic: the official SDK and plain HTTP talk to a live daemon,
then the exposition is parsed with prometheus_client's own parser and every counter is
checked against what the test sent and what the daemon reported in `usage`."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import TINY_MODEL
from prometheus_client.parser import text_string_to_metric_families

KEY = "metrics-test-key"
USER = [{"role": "user", "content": "What is the capital of France?"}]


def scrape(base_url: str, key: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample, keyed by (name, sorted labels)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_match_the_traffic_sent(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, keep_alive=-1)
    server.wait_healthy()
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    usages = []
    for max_tokens in (3, 5):
        usages.append(client.chat.completions.create(model=TINY_MODEL, messages=USER, max_tokens=max_tokens).usage)
    stream = client.chat.completions.create(model=TINY_MODEL, messages=USER, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True})
    usages.append([chunk.usage for chunk in stream if chunk.usage][0])
    usages.append(client.completions.create(model=TINY_MODEL, prompt="The sea is", max_tokens=6).usage)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=TINY_MODEL, messages=USER, n=99)
    assert httpx.get(f"{server.base_url}/v1/models/{TINY_MODEL}").status_code == 200

    samples = scrape(server.base_url)
    chat = "/v1/chat/completions"
    assert value(samples, "elmd_requests_total", endpoint=chat, status="200") == 3
    assert value(samples, "elmd_requests_total", endpoint=chat, status="404") == 1
    assert value(samples, "elmd_requests_total", endpoint=chat, status="400") == 1
    assert value(samples, "elmd_requests_total", endpoint="/v1/completions", status="200") == 1
    # a path parameter is labelled by its route template, never by the value sent
    assert value(samples, "elmd_requests_total", endpoint="/v1/models/{model_id}", status="200") == 1
    assert not any(TINY_MODEL in dict(labels).get("endpoint", "") for _, labels in samples)

    model = {"model": TINY_MODEL}
    assert value(samples, "elmd_prompt_tokens_total", **model) == sum(u.prompt_tokens for u in usages)
    assert value(samples, "elmd_generation_tokens_total", **model) == sum(u.completion_tokens for u in usages)
    generations = len(usages)
    assert value(samples, "elmd_time_to_first_token_seconds_count", **model) == generations
    assert value(samples, "elmd_time_to_first_token_seconds_bucket", le="+Inf", **model) == generations
    assert value(samples, "elmd_time_per_output_token_seconds_count", **model) == sum(
        1 for u in usages if u.completion_tokens > 1)
    assert value(samples, "elmd_running_sequences", **model) == 0
    assert value(samples, "elmd_queued_requests") == 0
    assert value(samples, "elmd_model_loads_total", **model) == 1
    assert value(samples, "elmd_model_memory_bytes", **model) > 0
    assert value(samples, "elmd_kv_cache_bytes", **model) > 0
    assert value(samples, "elmd_generation_tokens_per_second") == pytest.approx(
        sum(u.completion_tokens for u in usages) / 60)


def test_prefix_cache_hits_and_bytes(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, keep_alive=-1)
    server.wait_healthy()
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    usages = [client.chat.completions.create(model=TINY_MODEL, messages=USER, max_tokens=2).usage for _ in range(2)]
    hits = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert hits > 0  # the second request reused the first one's prompt

    samples = scrape(server.base_url)
    model = {"model": TINY_MODEL}
    assert value(samples, "elmd_prefix_cache_hit_tokens_total", **model) == hits
    assert value(samples, "elmd_prefix_cache_hit_ratio", **model) == pytest.approx(
        hits / sum(u.prompt_tokens for u in usages))
    assert value(samples, "elmd_prefix_cache_bytes", **model) > 0


def test_unloads_and_429s_are_counted(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, max_concurrent_requests=1, max_queued_requests=0)
    server.wait_healthy()
    body = {"model": TINY_MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        next(lines)  # the stream holds the only slot
        running = scrape(server.base_url)
        for _ in range(2):
            busy = httpx.post(f"{server.v1}/chat/completions", json={**body, "stream": False}, timeout=60)
            assert busy.status_code == 429
    assert value(running, "elmd_running_sequences", model=TINY_MODEL) == 1

    # keep_alive 0 unloads the model as soon as this request is done (once the slot is free again)
    deadline = time.monotonic() + 30
    while httpx.post(f"{server.v1}/chat/completions", json={
            "model": TINY_MODEL, "messages": USER, "max_tokens": 1, "keep_alive": 0}, timeout=60).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while value(samples := scrape(server.base_url), "elmd_model_unloads_total", model=TINY_MODEL) != 1:
        assert time.monotonic() < deadline, "the model was not unloaded"
        time.sleep(0.05)
    assert value(samples, "elmd_rate_limited_requests_total") == 2
    assert value(samples, "elmd_requests_total", endpoint="/v1/chat/completions", status="429") == 2
    assert value(samples, "elmd_running_sequences", model=TINY_MODEL) == 0
    assert ("elmd_model_memory_bytes", (("model", TINY_MODEL),)) not in samples  # no longer loaded


def test_metrics_need_the_key_and_a_local_host(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, api_key=KEY, keep_alive=-1)
    refused = httpx.get(f"{server.base_url}/metrics")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
    rebound = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {KEY}", "Host": "evil.example"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    samples = scrape(server.base_url, KEY)
    # refusals by the security checks are counted too, under the route they were for
    assert value(samples, "elmd_requests_total", endpoint="/metrics", status="401") == 1
    assert value(samples, "elmd_requests_total", endpoint="/metrics", status="403") == 1
    assert value(samples, "elmd_requests_total", endpoint="other", status="401") == 0
