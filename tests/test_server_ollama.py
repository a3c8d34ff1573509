"""Ollama's API (/api/...) driven like a user: the official `ollama` Python client, the exact
request body Open WebUI sends for a chat, and raw HTTP for the NDJSON framing, against the
real daemon serving a generated tiny checkpoint. The OpenAI chat route is the reference:
the same conversation and sampling give the same text on both."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from datetime import datetime

import httpx
import jsonschema
import ollama
import pytest
from conftest import TINY_MODEL

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
# The tiny model's greedy answers are whitespace (stripped to ""), so comparisons sample with a seed.
SEEDED = {"temperature": 1.0, "seed": 3, "num_predict": 8}


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.base_url)


def openai_text(server, messages=MESSAGES, **extra) -> str:
    body = {"model": TINY_MODEL, "messages": messages, "max_tokens": 8, "temperature": 1.0, "seed": 3, **extra}
    return httpx.post(f"{server.v1}/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def prompt_tokens(server, messages) -> int:
    return httpx.post(f"{server.base_url}/tokenize", json={"messages": messages}).json()["count"]


def ndjson(response: httpx.Response) -> list[dict]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]


def test_chat_matches_the_openai_route(server, client):
    reply = client.chat(model=TINY_MODEL, messages=MESSAGES, stream=False, options=SEEDED)
    assert reply.message.role == "assistant" and reply.message.content == openai_text(server)
    assert reply.message.content.strip()
    assert reply.done is True and reply.done_reason == "length" and reply.model == TINY_MODEL
    assert reply.eval_count == 8 and 0 < reply.prompt_eval_count <= prompt_tokens(server, MESSAGES)
    assert reply.total_duration >= reply.eval_duration > 0 and reply.load_duration >= 0
    assert datetime.fromisoformat(reply.created_at.replace("Z", "+00:00")).tzinfo is not None


def test_chat_streams_by_default(server, client):
    parts = list(client.chat(model=TINY_MODEL, messages=MESSAGES, stream=True, options=SEEDED))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "length"
    assert parts[-1].message.content == "" and parts[-1].eval_count == 8
    assert "".join(p.message.content for p in parts) == openai_text(server)

    raw = httpx.post(f"{server.base_url}/api/chat", json={"model": TINY_MODEL, "messages": MESSAGES,
                                                           "options": SEEDED})
    lines = ndjson(raw)
    assert len(lines) > 1 and lines[-1]["done"] is True
    assert set(lines[0]) == {"model", "created_at", "message", "done"}
    assert {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration", "done_reason"} <= set(lines[-1])


def test_async_client_streams(server):
    async def chat() -> str:
        client = ollama.AsyncClient(host=server.base_url)
        parts = [part async for part in await client.chat(model=TINY_MODEL, messages=MESSAGES, stream=True,
                                                          options=SEEDED)]
        return "".join(part.message.content for part in parts)

    assert asyncio.run(chat()) == openai_text(server)


def test_open_webui_chat_body(server):
    """What Open WebUI (backend/open_webui/utils/payload.py, convert_payload_openai_to_ollama
    and apply_model_params_to_body_ollama) posts to /api/chat for a chat with parameters set."""
    body = {
        "model": TINY_MODEL,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Hello"},
                     {"role": "assistant", "content": "Hi! How can I help?"},
                     {"role": "user", "content": "Tell me a joke."}],
        "stream": True,
        "options": {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 42, "num_ctx": 2048,
                    "num_predict": 12, "repeat_penalty": 1.1, "num_thread": 2, "use_mmap": True, "num_gpu": 0,
                    "mirostat": 0, "stop": ["\n\n"]},
        "keep_alive": -1,  # Open WebUI passes a model's keep_alive setting through (parsed as JSON)
        "metadata": {"user_id": "u", "chat_id": "c", "message_id": "m", "session_id": "s", "features": {}},
    }
    first = ndjson(httpx.post(f"{server.base_url}/api/chat", json=body))
    again = ndjson(httpx.post(f"{server.base_url}/api/chat", json=body))
    text = "".join(line["message"]["content"] for line in first)
    assert text == "".join(line["message"]["content"] for line in again)  # the seed holds
    assert first[-1]["done"] and first[-1]["done_reason"] in ("stop", "length") and "\n\n" not in text
    same = openai_text(server, body["messages"], temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, seed=42,
                       max_tokens=12, repetition_penalty=1.1, stop=["\n\n"])
    assert text == same and text.strip()


def test_generate_templated_raw_and_streamed(server, client):
    reply = client.generate(model=TINY_MODEL, prompt="Name a colour.", system="Be brief.", stream=False,
                            options=SEEDED)
    assert reply.response == openai_text(server) and reply.done and reply.eval_count == 8
    parts = list(client.generate(model=TINY_MODEL, prompt="Name a colour.", system="Be brief.",
                                 options=SEEDED, stream=True))
    assert "".join(p.response for p in parts) == reply.response and parts[-1].done
    raw = client.generate(model=TINY_MODEL, prompt="The capital of France is", raw=True, options=SEEDED)
    completion = httpx.post(f"{server.v1}/completions", json={"model": TINY_MODEL, "prompt": "The capital of France is",
                                                               "max_tokens": 8, "temperature": 1.0, "seed": 3}).json()
    assert raw.response == completion["choices"][0]["text"].lstrip() and raw.response.strip()
    assert raw.prompt_eval_count <= len(httpx.post(f"{server.base_url}/tokenize",
                                                   json={"prompt": "The capital of France is"}).json()["tokens"])


def test_options_map_to_sampling(server, client):
    options = {"temperature": 1.0, "seed": 7, "num_predict": 10}
    one = client.chat(model=TINY_MODEL, messages=MESSAGES, options=options).message.content
    assert client.chat(model=TINY_MODEL, messages=MESSAGES, options=options).message.content == one
    assert openai_text(server, temperature=1.0, seed=7, max_tokens=10) == one
    stop = one.strip()[2:5]
    assert len(stop) == 3
    cut = client.chat(model=TINY_MODEL, messages=MESSAGES, options={**options, "stop": [stop]})
    assert cut.done_reason == "stop" and cut.message.content == one[: one.index(stop)]


def test_tags_show_ps_version(server, client):
    tags = client.list()
    assert [m.model for m in tags.models] == [TINY_MODEL]
    model = tags.models[0]
    assert model.details.family == "openelm" and model.details.quantization_level == "none"
    assert model.size > 0 and len(model.digest) == 64 and model.details.parameter_size.endswith("M")
    shown = client.show(TINY_MODEL)
    assert shown.capabilities == ["completion", "tools"] and shown.details.family == "openelm"
    assert shown.modelinfo["openelm.context_length"] > 0 and shown.template
    assert client.show(f"{TINY_MODEL}:latest").details == shown.details  # clients add :latest
    running = client.ps()
    assert [m.model for m in running.models] == [TINY_MODEL]
    assert running.models[0].size > 0 and running.models[0].context_length == shown.modelinfo["openelm.context_length"]
    assert running.models[0].expires_at.year > 2300  # the session server keeps its model forever
    assert httpx.get(f"{server.base_url}/api/version").json()["version"].count(".") == 2


def test_show_gives_the_context_the_engine_will_have_before_it_loads(start_server, tiny_checkpoint, tmp_path,
                                                                     monkeypatch):
    """A checkpoint whose context passes its rotary embedding's reach: /api/show says the
    capped length both before the model loads and after (one rule, elmd.engine.protocol)."""
    from elmd.store import Store

    monkeypatch.setenv("ELMD_HOME", str(tmp_path / "home"))
    with Store().installing("tiny-long") as folder:
        shutil.copytree(tiny_checkpoint, folder, dirs_exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "max_context_length": 8192, "rope_max_length": 1024}))
    client = ollama.Client(host=start_server().base_url)
    assert client.show("tiny-long").modelinfo["openelm.context_length"] == 1024
    client.generate(model="tiny-long", prompt="Hi", options={"num_predict": 1})
    assert client.ps().models[0].context_length == client.show("tiny-long").modelinfo["openelm.context_length"] == 1024


@pytest.mark.parametrize("extra, name", [
    ({"messages": [{"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]}]}, "images"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "format": "json"}, "format"),
    ({"think": True}, "think"),
    ({"options": {"mirostat": 2}}, "mirostat"),
    ({"messages": [{"role": "wizard", "content": "42"}]}, "role"),
    ({"options": {"temperature": "hot"}}, "options.temperature"),
    ({"messages": "hi"}, "messages"),
    ({"keep_alive": "soon"}, "keep_alive"),
])
def test_refusals_are_clear_ollama_errors(server, client, extra, name):
    body = {"model": TINY_MODEL, "messages": MESSAGES, **extra}
    response = httpx.post(f"{server.base_url}/api/chat", json=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"} and name in response.json()["error"]
    if isinstance(body["messages"], list):  # the client itself refuses other types
        with pytest.raises(ollama.ResponseError) as refused:
            client.chat(**body)
        assert refused.value.status_code == 400 and name in refused.value.error


def test_generate_refuses_images_and_unknown_models(server, client):
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=TINY_MODEL, prompt="What is this?", images=[b"\x89PNG\r\n"])
    assert refused.value.status_code == 400 and "images" in refused.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="no-such-model", messages=MESSAGES)
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error
    unknown_route = httpx.get(f"{server.base_url}/api/nothing")
    assert unknown_route.status_code == 404 and isinstance(unknown_route.json()["error"], str)


def test_a_generator_asked_to_embed_is_a_400(server, client):
    """Embedding models answer /api/embed (tests/test_server_embeddings.py); a generator does not."""
    for call in (lambda: client.embed(model=TINY_MODEL, input="hello"),
                 lambda: client.embeddings(model=TINY_MODEL, prompt="hello")):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 400 and "embedding head" in refused.value.error


def test_keep_alive_loads_and_unloads(start_server, tiny_checkpoint):
    running = start_server(tiny_checkpoint, preload=False)
    client = ollama.Client(host=running.base_url)
    assert client.ps().models == []
    loaded = client.chat(model=TINY_MODEL, messages=[], keep_alive="1h")
    assert loaded.done and loaded.done_reason == "load"
    [model] = client.ps().models
    assert 3500 < (model.expires_at.timestamp() - time.time()) <= 3600
    unloaded = client.generate(model=TINY_MODEL, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload" and client.ps().models == []
    client.generate(model=TINY_MODEL, prompt="Hi", keep_alive=0, options={"num_predict": 2})
    deadline = time.monotonic() + 10
    while client.ps().models and time.monotonic() < deadline:  # unloaded once the request ends
        time.sleep(0.05)
    assert client.ps().models == []


def test_delete_removes_a_stored_model(start_server, tiny_checkpoint, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_checkpoint, store / "tiny-copy")
    running = start_server(None, store_root=store, keep_alive=-1)
    client = ollama.Client(host=running.base_url)
    shutil.copytree(tiny_checkpoint, store / "damaged")
    (store / "damaged" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    assert [m.model for m in client.list().models] == ["damaged", "tiny-copy"]  # listed, though it cannot load
    client.delete("damaged")
    assert [m.model for m in client.list().models] == ["tiny-copy"]
    assert client.generate(model="tiny-copy:latest", prompt="Hi", options={"num_predict": 2}).done
    assert client.delete("tiny-copy").status == "success"
    assert client.list().models == [] and client.ps().models == [] and not (store / "tiny-copy").exists()
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("tiny-copy")
    assert missing.value.status_code == 404


def test_security_rules_hold_on_ollama_routes(start_server, tiny_checkpoint):
    key = "elmd-test-key"
    running = start_server(tiny_checkpoint, api_key=key, keep_alive=-1, max_body_bytes=4096)
    chat = {"model": TINY_MODEL, "messages": MESSAGES, "stream": False, "options": {"num_predict": 2}}
    refused = httpx.post(f"{running.base_url}/api/chat", json=chat)
    assert refused.status_code == 401 and isinstance(refused.json()["error"], str)
    with pytest.raises(ollama.ResponseError):
        ollama.Client(host=running.base_url).list()
    keyed = ollama.Client(host=running.base_url, headers={"Authorization": f"Bearer {key}"})
    assert keyed.chat(**chat).done
    headers = {"Authorization": f"Bearer {key}"}
    rebound = httpx.get(f"{running.base_url}/api/tags", headers={**headers, "Host": "attacker.example"})
    assert rebound.status_code == 403
    cross = httpx.post(f"{running.base_url}/api/chat", json=chat, headers={**headers, "Origin": "https://evil.example"})
    assert cross.status_code == 403 and "access-control-allow-origin" not in cross.headers
    large = httpx.post(f"{running.base_url}/api/chat", headers=headers,
                       json={**chat, "messages": [{"role": "user", "content": "x" * 8000}]})
    assert large.status_code == 413
    assert keyed.chat(**chat).done  # still serving


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """An ELMD_HOME whose models.yaml names a model on a local stand-in for the hub
    (tests/fakehub.py, as tests/test_pull.py uses); the daemon's pull child inherits it."""
    from fakehub import FakeHub
    from test_pull import MODEL, TOKENIZER_REPO, WEIGHTS_REPO, tokenizer_repo, weights_repo

    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "models.yaml").write_text(f"""
models:
  - id: {MODEL}
    architecture: openelm
    context_length: 128
    source:
      weights: {{hub: {WEIGHTS_REPO}}}
      tokenizer: {{hub: {TOKENIZER_REPO}}}
""")
    with FakeHub({WEIGHTS_REPO: weights_repo(), TOKENIZER_REPO: tokenizer_repo()}) as hub:
        for key, value in {"ELMD_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf")}.items():
            monkeypatch.setenv(key, value)
        yield hub, MODEL, WEIGHTS_REPO


def test_pull_streams_the_store_s_pull(start_server, hub_home):
    hub, model, weights_repo = hub_home
    running = start_server(None)
    client = ollama.Client(host=running.base_url)
    statuses = [progress.status for progress in client.pull(model, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "pulling model.safetensors" in statuses and "pulling tokenizer.json" in statuses
    assert hub.downloads("model.safetensors")  # downloaded by the child process
    assert model in [m.model for m in client.list().models]
    assert client.pull(f"{model}:latest").status == "success"  # already installed: nothing to do
    with pytest.raises(ollama.ResponseError) as unknown:
        client.pull("no-such-model")
    assert unknown.value.status_code == 404 and "models.yaml" in unknown.value.error


def test_a_failed_pull_is_an_error_and_installs_nothing(start_server, hub_home):
    hub, model, weights_repo = hub_home
    hub.corrupt.add((weights_repo, "model.safetensors"))
    running = start_server(None)
    client = ollama.Client(host=running.base_url)
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.pull(model, stream=True))
    assert "corrupt" in streamed.value.error
    with pytest.raises(ollama.ResponseError) as plain:
        client.pull(model)
    assert plain.value.status_code == 500 and "corrupt" in plain.value.error
    assert client.list().models == []


def test_a_failure_mid_stream_is_an_error_line(server, start_server, tiny_checkpoint):
    # a seed whose answer runs to num_predict without an EOS (found on the session server,
    # which has no short timeout), so the timeout below falls in the middle of it
    long = {"model": TINY_MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 1500}}
    seed = next(seed for seed in range(40) if httpx.post(f"{server.base_url}/api/generate", timeout=120, json={
        **long, "options": {**long["options"], "seed": seed}}).json()["done_reason"] == "length")
    running = start_server(tiny_checkpoint, request_timeout=0.3, keep_alive=-1)
    deadline = time.monotonic() + 60
    while httpx.get(f"{running.base_url}/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # loaded: the timeout then falls in the middle of the generation
    long["options"]["seed"] = seed
    plain = httpx.post(f"{running.base_url}/api/generate", json=long, timeout=60)
    assert plain.status_code == 503 and plain.json() == {"error": "The request timed out."}
    lines = ndjson(httpx.post(f"{running.base_url}/api/generate", json={**long, "stream": True}, timeout=60))
    assert lines[-1] == {"error": "The request timed out."} and not any(line.get("done") for line in lines)


def test_format_constrains_chat_and_generate(server, client):
    """`format: "json"` gives a JSON object, a schema its instances (random weights: the grammar's doing)."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}
    reply = client.chat(model=TINY_MODEL, messages=MESSAGES, format=schema, options={"num_predict": 48})
    jsonschema.validate(json.loads(reply.message.content), schema)
    parts = list(client.generate(model=TINY_MODEL, prompt="Answer in JSON.", format=schema, stream=True,
                                 options={"num_predict": 48}))
    assert parts[-1].done_reason == "stop"
    jsonschema.validate(json.loads("".join(part.response for part in parts)), schema)
    anything = client.generate(model=TINY_MODEL, prompt="Answer in JSON.", format="json", options={"num_predict": 32})
    assert anything.response.startswith("{")  # a random model may write one key until the limit
    if anything.done_reason == "stop":
        assert isinstance(json.loads(anything.response), dict)
    refused = httpx.post(f"{server.base_url}/api/chat", json={"model": TINY_MODEL, "messages": MESSAGES, "format": "yaml"})
    assert refused.status_code == 400 and "format" in refused.json()["error"]
