"""The memory budget counts what a model holds as it grows (issue 22): weights, the KV cache
and cached prefixes, not only the size measured at load. A request whose KV cache would pass
the budget gets 503 `insufficient_memory` (cached prefixes give way first), and the daemon
goes on serving everyone else."""

from __future__ import annotations

import json
import shutil

import httpx

from conftest import TINY_MODEL


def complete(server, prompt_tokens: int, **extra) -> httpx.Response:
    body = {"model": TINY_MODEL, "prompt": [5 + i % 900 for i in range(prompt_tokens)], "max_tokens": 4,
            "temperature": 0, **extra}
    return httpx.post(f"{server.v1}/completions", json=body, timeout=120)


def resident_bytes(server) -> int:
    return httpx.get(f"{server.v1}/models/{TINY_MODEL}").json()["memory_bytes"]


def test_the_kv_cache_grows_within_the_budget_and_past_it_answers_503(start_server, tiny_checkpoint):
    probe = start_server(tiny_checkpoint)
    assert complete(probe, 8).status_code == 200
    model = probe.manager.loaded()[TINY_MODEL].backend.model
    idle, per_token = resident_bytes(probe), model.cache_bytes(1, 1)
    assert model.cache_shape == (1, 256) and idle > model.cache_bytes()

    # Beside the weights, the idle 256-token row and a short cached prefix, room for ~413 tokens
    # more: a 400-token prompt grows the row to 512 and its prefix then stays cached; a 700-token
    # one needs 700 tokens of row at the least, even with every cached prefix dropped.
    server = start_server(tiny_checkpoint, memory_budget_bytes=idle + 413 * per_token)
    assert complete(server, 8).status_code == 200
    baseline = resident_bytes(server)

    fits = complete(server, 400)  # the cache doubles to 512 tokens, then shrinks back when idle
    assert fits.status_code == 200, fits.text
    assert resident_bytes(server) > baseline  # its keys and values stay as a cached prefix, and count

    too_long = complete(server, 700)  # needs 1,024 tokens of cache, or 700 at the least
    assert too_long.status_code == 503, too_long.text
    error = too_long.json()["error"]
    assert error["code"] == "insufficient_memory" and "memory budget" in error["message"]
    assert resident_bytes(server) < baseline  # the cached prefixes gave way first

    with httpx.stream("POST", f"{server.v1}/completions", timeout=120,
                      json={"model": TINY_MODEL, "prompt": [7] * 700, "max_tokens": 4, "stream": True}) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "insufficient_memory"

    again = complete(server, 400)  # everyone else is still served
    assert again.status_code == 200 and again.json()["usage"]["prompt_tokens"] == 400


def test_an_idle_model_that_grew_is_unloaded_when_the_budget_needs_its_room(start_server, tiny_checkpoint, tmp_path):
    """Counted at their load-time size, two models fit the budget together; counted with the
    cached prefix one of them has grown since, they do not, so the idle one is unloaded."""
    from elmd.store import Store
    from test_server_lifecycle import loaded

    store = Store(tmp_path / "store")  # its own: the session's store is shared with other tests
    for name in ("grow-a", "grow-b"):
        with store.installing(name) as folder:
            shutil.copytree(tiny_checkpoint, folder, dirs_exist_ok=True)
    probe = start_server(tiny_checkpoint)
    assert complete(probe, 8).status_code == 200
    idle = resident_bytes(probe)
    per_token = probe.manager.loaded()[TINY_MODEL].backend.model.cache_bytes(1, 1)

    server = start_server(memory_budget_bytes=2 * idle + 100 * per_token, max_loaded_models=2, keep_alive=-1,
                          store_root=store.root)
    grown = httpx.post(f"{server.v1}/completions", timeout=120, json={
        "model": "grow-a", "prompt": [5 + i % 900 for i in range(400)], "max_tokens": 4, "temperature": 0})
    assert grown.status_code == 200
    assert httpx.get(f"{server.v1}/models/grow-a").json()["memory_bytes"] > idle + 300 * per_token
    small = httpx.post(f"{server.v1}/completions", timeout=120,
                       json={"model": "grow-b", "prompt": "hello", "max_tokens": 2})
    assert small.status_code == 200
    assert loaded(server) == {"grow-a": False, "grow-b": True}
