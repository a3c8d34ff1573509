"""Model lifecycle and back-pressure: load on first use, keep-alive unload (setting and
Ollama's `keep_alive` field), count and memory caps with LRU eviction, loads that never
block other models, /health while loading, 429 when the queue is full, per-request
timeouts, a failed load answered with a clean 500, and SSE keep-alive pings."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest
from conftest import TINY_MODEL

from elmd.server.manager import load_model

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """Each test gets its own empty store."""
    monkeypatch.setenv("ELMD_HOME", str(tmp_path / "home"))


def install(name: str, checkpoint) -> None:
    from elmd.store import Store

    with Store().installing(name) as folder:
        shutil.copytree(checkpoint, folder, dirs_exist_ok=True)


def chat(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": USER, "max_tokens": 2, **extra}
    return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)


def loaded(server) -> dict[str, bool]:
    return {m["id"]: m["loaded"] for m in httpx.get(f"{server.v1}/models").json()["data"]}


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def gated_loader(gate: threading.Event, gated: set[str]):
    """The real loader, held back for the models in `gated` until `gate` opens."""

    def load(spec):
        if spec.id in gated:
            assert gate.wait(60)
        return load_model(spec)

    return load


def test_loads_on_first_use_and_reports_residency(start_server, tiny_checkpoint):
    install("tiny-a", tiny_checkpoint)
    server = start_server()
    health = httpx.get(f"{server.base_url}/health")
    assert health.status_code == 200 and health.json()["loaded"] == []
    assert loaded(server) == {"tiny-a": False}
    assert chat(server, "tiny-a").status_code == 200
    assert loaded(server) == {"tiny-a": True}
    assert httpx.get(f"{server.base_url}/health").json()["loaded"] == ["tiny-a"]
    card = httpx.get(f"{server.v1}/models/tiny-a").json()
    assert card["memory_bytes"] >= (tiny_checkpoint / "model.safetensors").stat().st_size // 2


def test_request_keep_alive_zero_unloads_when_done(start_server, tiny_checkpoint):
    install("tiny-a", tiny_checkpoint)
    server = start_server(keep_alive=-1)
    assert chat(server, "tiny-a").status_code == 200
    assert loaded(server)["tiny-a"]
    assert chat(server, "tiny-a", keep_alive=0).status_code == 200
    assert wait_for(lambda: not loaded(server)["tiny-a"])


def test_keep_alive_setting_unloads_idle_models_and_they_reload(start_server, tiny_checkpoint):
    install("tiny-a", tiny_checkpoint)
    server = start_server(keep_alive="1s")
    assert chat(server, "tiny-a").status_code == 200
    assert loaded(server)["tiny-a"]
    assert wait_for(lambda: not loaded(server)["tiny-a"], timeout=5)
    assert chat(server, "tiny-a").status_code == 200  # loads again on the next request


def test_request_keep_alive_forever_outlives_the_setting(start_server, tiny_checkpoint):
    install("tiny-a", tiny_checkpoint)
    server = start_server(keep_alive=0.3)
    assert chat(server, "tiny-a", keep_alive="-1").status_code == 200
    time.sleep(1.0)
    assert loaded(server)["tiny-a"]


def test_max_loaded_models_evicts_the_least_recently_used(start_server, tiny_checkpoint):
    for name in ("tiny-a", "tiny-b"):
        install(name, tiny_checkpoint)
    server = start_server(max_loaded_models=1, keep_alive=-1)
    assert chat(server, "tiny-a").status_code == 200
    assert chat(server, "tiny-b").status_code == 200
    assert loaded(server) == {"tiny-a": False, "tiny-b": True}


def test_memory_budget_caps_resident_models(start_server, tiny_checkpoint):
    for name in ("tiny-a", "tiny-b"):
        install(name, tiny_checkpoint)
    weights = (tiny_checkpoint / "model.safetensors").stat().st_size
    server = start_server(memory_budget_bytes=int(weights * 1.5), max_loaded_models=4, keep_alive=-1)
    assert chat(server, "tiny-a").status_code == 200
    assert chat(server, "tiny-b").status_code == 200
    assert loaded(server) == {"tiny-a": False, "tiny-b": True}
    small = start_server(memory_budget_bytes=weights // 2)
    response = chat(small, "tiny-a")
    assert response.status_code == 503 and response.json()["error"]["code"] == "insufficient_memory"


def test_a_load_never_blocks_requests_to_another_model(start_server, tiny_checkpoint):
    for name in ("tiny-a", "tiny-b"):
        install(name, tiny_checkpoint)
    gate = threading.Event()
    server = start_server(loader=gated_loader(gate, {"tiny-b"}), keep_alive=-1)
    assert chat(server, "tiny-a").status_code == 200
    results = {}
    waiting = threading.Thread(target=lambda: results.setdefault("b", chat(server, "tiny-b")))
    waiting.start()
    try:
        assert wait_for(lambda: httpx.get(f"{server.base_url}/health").json()["loading"] == ["tiny-b"])
        started = time.monotonic()
        assert chat(server, "tiny-a").status_code == 200
        assert time.monotonic() - started < 5
        assert httpx.get(f"{server.base_url}/health").status_code == 200  # a model is ready
    finally:
        gate.set()
        waiting.join(60)
    assert results["b"].status_code == 200


def test_health_is_503_while_the_start_model_loads(start_server, tiny_checkpoint):
    gate = threading.Event()
    server = start_server(tiny_checkpoint, loader=gated_loader(gate, {TINY_MODEL}))
    try:
        response = httpx.get(f"{server.base_url}/health")
        assert response.status_code == 503 and response.json()["status"] == "loading"
    finally:
        gate.set()
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 200)


def test_full_queue_answers_429_with_retry_after(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, max_concurrent_requests=1, max_queued_requests=0)
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 200)
    body = {"model": TINY_MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()  # keep a reference: a dropped iterator closes the connection
        next(lines)  # the request holds the only slot
        busy = chat(server, TINY_MODEL)
        assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"
    # the client went away: its slot frees and the daemon answers again
    assert wait_for(lambda: chat(server, TINY_MODEL).status_code == 200)


def test_a_client_that_gives_up_frees_its_slot(start_server, tiny_checkpoint):
    """A non-streamed request whose client disconnects stops generating: with one slot, the
    next request is served long before the abandoned one would have finished (~7 s)."""
    server = start_server(tiny_checkpoint, max_concurrent_requests=1, max_queued_requests=0)
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 200)
    body = {"model": TINY_MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/chat/completions", json=body, timeout=0.5)
    started = time.monotonic()
    assert wait_for(lambda: chat(server, TINY_MODEL).status_code == 200, timeout=3)
    assert time.monotonic() - started < 3


def test_queued_requests_wait_for_a_slot(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, max_concurrent_requests=1, max_queued_requests=4)
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 200)
    responses = []
    threads = [threading.Thread(target=lambda: responses.append(chat(server, TINY_MODEL, max_tokens=20))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r.status_code for r in responses] == [200] * 4


def test_request_timeout(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, request_timeout=0.3)
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 200)
    response = chat(server, TINY_MODEL, max_tokens=1500, ignore_eos=True)
    assert response.status_code == 503 and response.json()["error"]["code"] == "timeout"
    assert "Retry-After" in response.headers
    body = {"model": TINY_MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    streamed = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60).text
    assert '"code": "timeout"' in streamed and streamed.rstrip().endswith("data: [DONE]")


def test_failed_load_is_a_clean_500_and_the_daemon_keeps_serving(start_server, tiny_checkpoint):
    install("tiny-a", tiny_checkpoint)
    install("broken", tiny_checkpoint)
    from elmd.store import Store

    (Store().path("broken") / "model.safetensors").write_bytes(b"not a safetensors file")
    server = start_server()
    response = chat(server, "broken")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "model_load_failed" and error["type"] == "server_error"
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert chat(server, "tiny-a").status_code == 200


def test_sse_comment_pings_keep_the_stream_alive(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, sse_ping_seconds=0.05)
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 200)
    body = {"model": TINY_MODEL, "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}
    text = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60).text
    assert "\n: ping" in text or text.startswith(": ping")
    assert text.rstrip().endswith("data: [DONE]")


def test_an_unexpected_error_is_a_bare_500_and_the_daemon_keeps_serving(start_server, tiny_checkpoint, tmp_path):
    """A user's models.yaml gives a model a chat template that fails while rendering: the
    request gets OpenAI's error object with no internals, and the next request is served."""
    install("tiny-a", tiny_checkpoint)
    install("tiny-broken-template", tiny_checkpoint)
    from elmd import paths

    paths.config_dir().mkdir(parents=True, exist_ok=True)
    (paths.config_dir() / "models.yaml").write_text(
        "models:\n"
        "  - id: tiny-broken-template\n"
        "    architecture: openelm\n"
        "    context_length: 2048\n"
        "    chat_template: \"{{ raise_exception('template trouble') }}\"\n"
        "    source: {weights: {hub: x/y}, tokenizer: {hub: x/y}}\n"
    )
    server = start_server()
    response = chat(server, "tiny-broken-template")
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "The server had an error while processing your request.",
                                         "type": "server_error", "param": None, "code": "internal_error"}
    assert chat(server, "tiny-a").status_code == 200
