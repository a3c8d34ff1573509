"""LoRA adapters served as models of their own, through the real daemon and the official
clients: `serve --lora-modules` (one adapter in mlx-lm's layout, one in PEFT's, over the tiny
fixture) and adapters kept in the store by `elmd import --adapter-for`. An adapter's greedy
reply differs from the base's and equals the engine view's own; every API names the adapter
in its answer; an adapter that does not fit is a 400 naming the file and key while the base
and the good adapters keep answering."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import torch
from conftest import TINY_MODEL, build_app, serve_app
from safetensors.torch import load_file, save_file
from test_server_cli import elmd_serve, run_serve

from elmd.fixtures import write_adapter, write_checkpoint

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"max_tokens": 8, "temperature": 0}
GOOD = ("mlx-lora", "peft-lora")


def add_lm_head(folder: Path) -> None:
    """A PEFT tensor for the output head: a target elmd does not adapt."""
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 128)
    save_file(tensors, str(file))


def truncate(folder: Path) -> None:
    file = folder / "adapters.safetensors"
    file.write_bytes(file.read_bytes()[:100])


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Adapter folders by name: the two good ones, then one per way an adapter cannot be served."""
    root = tmp_path_factory.mktemp("adapters")
    wider = write_checkpoint(root / "wider-base", "tiny", seed=1, config_overrides={"model_dim": 192})
    deeper = write_checkpoint(root / "deeper-base", "tiny", seed=1,
                              config_overrides={"num_transformer_layers": 6, "ffn_multipliers": [1.0] * 6,
                                                "num_query_heads": [4] * 6, "num_kv_heads": [2] * 6})
    folders = {
        "mlx-lora": write_adapter(root / "mlx", tiny_checkpoint, "mlx", seed=0),
        "peft-lora": write_adapter(root / "peft", tiny_checkpoint, "peft", seed=1),
        "wider-lora": write_adapter(root / "wider", wider, "mlx"),
        "deeper-lora": write_adapter(root / "deeper", deeper, "peft", layers=3),  # its last 3 of 6 layers
        "corrupt-lora": write_adapter(root / "corrupt", tiny_checkpoint, "mlx"),
        "head-lora": write_adapter(root / "head", tiny_checkpoint, "peft"),
        "empty-lora": root / "empty",
        "gone-lora": write_adapter(root / "gone", tiny_checkpoint, "mlx"),
    }
    truncate(folders["corrupt-lora"])
    add_lm_head(folders["head-lora"])
    folders["empty-lora"].mkdir()
    return folders


# What each bad adapter's 400 must name: its file and the key that does not fit.
REFUSED = {
    "wider-lora": ["adapters.safetensors", "transformer.layers.0.attn", "do not fit"],
    "deeper-lora": ["adapter_model.safetensors", "transformer.layers.", "the base has"],
    "corrupt-lora": ["adapters.safetensors", "cannot read safetensors"],
    "head-lora": ["adapter_model.safetensors", "lm_head"],
    "empty-lora": ["empty", "no adapter_config.json"],
    "gone-lora": ["gone", "no such adapter folder"],
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, adapters, tmp_path_factory):
    """The tiny checkpoint as `tiny-openelm` with every adapter of `adapters` as --lora-modules;
    `gone-lora`'s folder is removed once the daemon has started (after its startup check)."""
    app, manager = build_app(tiny_checkpoint, store_root=tmp_path_factory.mktemp("lora-store"), keep_alive=600,
                             lora_modules=adapters)
    with serve_app(app, manager) as running:
        running.wait_healthy(what="the tiny model")
        shutil.rmtree(adapters["gone-lora"])
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def base_engine(server):
    return server.manager.loaded()[TINY_MODEL]


def completion(client, model: str) -> str:
    answer = client.completions.create(model=model, prompt=PROMPT, extra_body={"ignore_eos": True}, **GREEDY)
    assert answer.model == model
    return answer.choices[0].text


def chat(client, model: str) -> str:
    return chat_answer(client, model).choices[0].message.content


def chat_answer(client, model: str):
    answer = client.chat.completions.create(model=model, messages=MESSAGES, extra_body={"ignore_eos": True}, **GREEDY)
    assert answer.model == model
    return answer


def test_models_lists_each_adapter_with_its_base_as_parent(server, client, adapters):
    cards = {card.id: card for card in client.models.list().data}
    assert list(cards) == [TINY_MODEL, *adapters]
    assert cards[TINY_MODEL].parent is None
    for name, folder in adapters.items():
        assert (cards[name].parent, cards[name].root, cards[name].object) == (TINY_MODEL, str(folder), "model")
    completion(client, "mlx-lora")
    card = client.models.retrieve("mlx-lora")
    assert card.parent == TINY_MODEL and card.loaded is True
    assert card.memory_bytes == base_engine(server).adapters["mlx-lora"].nbytes > 0  # counted in the base's too
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-lora")


def test_an_adapter_replies_as_the_engine_view_does_and_unlike_the_base(server, client, adapters):
    base = base_engine(server)
    texts = {model: completion(client, model) for model in (TINY_MODEL, *GOOD)}
    replies = {model: chat(client, model) for model in (TINY_MODEL, *GOOD)}
    assert len(set(texts.values())) == 3 and len(set(replies.values())) == 3, (texts, replies)
    for name in GOOD:
        view = base.with_adapter(name, adapters[name])
        assert view.complete(PROMPT, ignore_eos=True, **GREEDY) == texts[name]
        assert view.chat(MESSAGES, ignore_eos=True, **GREEDY) == replies[name]
    assert base.complete(PROMPT, ignore_eos=True, **GREEDY) == texts[TINY_MODEL]
    fingerprints = {model: chat_answer(client, model).system_fingerprint for model in (TINY_MODEL, *GOOD)}
    assert len(set(fingerprints.values())) == 3  # a reply under an adapter names it in its fingerprint
    assert fingerprints[TINY_MODEL] == base.info.system_fingerprint


def test_an_adapter_streams(client):
    for name in GOOD:
        chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, stream=True,
                                                     extra_body={"ignore_eos": True}, **GREEDY))
        assert {chunk.model for chunk in chunks} == {name}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat(client, name)


def test_every_api_selects_the_adapter_by_model(server, client):
    expected = chat(client, "peft-lora")
    reply = ollama.Client(host=server.base_url).chat(model="peft-lora", messages=MESSAGES, stream=False,
                                                      options={"temperature": 0, "num_predict": 8})
    assert reply.model == "peft-lora" and reply.message.content.strip()
    responses = httpx.post(f"{server.v1}/responses", json={"model": "peft-lora", "input": MESSAGES[0]["content"],
                                                          "max_output_tokens": 8, "temperature": 0}, timeout=60)
    assert responses.status_code == 200 and responses.json()["model"] == "peft-lora"
    messages = httpx.post(f"{server.v1}/messages", json={"model": "peft-lora", "max_tokens": 8, "temperature": 0,
                                                        "messages": MESSAGES}, timeout=60)
    assert messages.status_code == 200 and messages.json()["model"] == "peft-lora"
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"model": "peft-lora", "prompt": PROMPT})
    assert tokens.json()["tokens"] == base_engine(server).tokenizer.encode(PROMPT)
    assert expected == chat(client, "peft-lora")  # the other routes changed nothing


def test_ollama_lists_and_shows_adapters_with_their_parent(server, adapters):
    listed = {model.model: model for model in ollama.Client(host=server.base_url).list().models}
    assert listed[TINY_MODEL].details.parent_model == ""
    assert all(listed[name].details.parent_model == TINY_MODEL for name in adapters)
    assert listed["mlx-lora"].digest != listed["peft-lora"].digest
    shown = ollama.Client(host=server.base_url).show("mlx-lora")
    assert shown.details.parent_model == TINY_MODEL and f"ADAPTER {adapters['mlx-lora']}" in shown.modelfile


@pytest.mark.parametrize("name", list(REFUSED))
def test_an_adapter_that_does_not_fit_is_a_400_naming_file_and_key(server, client, name):
    with pytest.raises(openai.BadRequestError) as refused:
        completion(client, name)
    error = refused.value.body
    assert (refused.value.status_code, error["code"], error["param"]) == (400, "adapter_invalid", "model")
    assert all(word in error["message"] for word in REFUSED[name]), error["message"]
    assert name not in base_engine(server).adapters
    ollama_error = httpx.post(f"{server.base_url}/api/generate", json={"model": name, "prompt": PROMPT, "stream": False})
    assert ollama_error.status_code == 400 and REFUSED[name][-1] in ollama_error.json()["error"]
    assert completion(client, TINY_MODEL) and completion(client, "mlx-lora")  # the others keep serving


def test_an_idle_adapter_unloads_and_the_base_stays(server, client):
    text = completion(client, "peft-lora")
    base = base_engine(server)
    base.adapters["peft-lora"].last_used -= 3600  # unused for an hour, past the keep-alive
    deadline = time.monotonic() + 30
    while "peft-lora" in base.adapters:
        assert time.monotonic() < deadline, "the reaper did not unload the idle adapter"
        time.sleep(0.05)
    assert base_engine(server) is base and client.models.retrieve("peft-lora").loaded is False
    assert completion(client, "peft-lora") == text  # read again on its next request


def wait_unloaded(base, adapter: str) -> None:
    deadline = time.monotonic() + 30
    while adapter in base.adapters:
        assert time.monotonic() < deadline, f"{adapter} was not unloaded"
        time.sleep(0.05)


def test_keep_alive_on_an_adapter_is_the_adapters_not_its_bases(server, client):
    """Ollama's `keep_alive` on an adapter's id: 0 unloads that adapter after its reply (and a
    request with no prompt unloads it at once), while the base, which other clients share,
    and the other adapter stay loaded with their own keep-alive; a duration is kept by the
    adapter alone."""
    ollama_client = ollama.Client(host=server.base_url)
    for name in GOOD:
        completion(client, name)
    base = base_engine(server)
    resident = server.manager._residency.models[TINY_MODEL]
    reply = ollama_client.generate(model="peft-lora", prompt=PROMPT, keep_alive=0, options={"num_predict": 4})
    assert reply.done and reply.model == "peft-lora"
    wait_unloaded(base, "peft-lora")
    assert base_engine(server) is base and "mlx-lora" in base.adapters and resident.keep_alive == 600
    assert ollama_client.generate(model="mlx-lora", keep_alive="7m").done_reason == "load"
    assert base.adapters["mlx-lora"].keep_alive == 420 and resident.keep_alive == 600
    assert ollama_client.generate(model="mlx-lora", keep_alive=0).done_reason == "unload"
    wait_unloaded(base, "mlx-lora")
    assert base_engine(server) is base and client.models.retrieve(TINY_MODEL).loaded is True
    assert completion(client, "mlx-lora") and "mlx-lora" in base.adapters  # loaded again on its next request
    assert base.adapters["mlx-lora"].keep_alive_given is False  # a new load takes the base's again


# -- the command line: `serve --lora-modules`, and adapters in the store ------------------------------


def elmd(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ELMD_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "elmd", *args], env=env, capture_output=True, text=True, timeout=120)


def test_serve_checks_lora_modules_at_start(tmp_path, tiny_checkpoint):
    syntax = run_serve(tmp_path, "--model", str(tiny_checkpoint), "--lora-modules", "my-lora")
    assert syntax.returncode == 2 and "expected NAME=DIR" in syntax.stderr, syntax.stderr
    name = run_serve(tmp_path, "--model", str(tiny_checkpoint), "--lora-modules", f"My-LoRA={tmp_path}")
    assert name.returncode == 2 and "invalid model name 'My-LoRA'" in name.stderr, name.stderr
    twice = run_serve(tmp_path, "--model", str(tiny_checkpoint), "--lora-modules", f"a={tmp_path}", f"a={tmp_path}")
    assert twice.returncode == 2 and "'a' is named twice" in twice.stderr, twice.stderr
    missing = run_serve(tmp_path, "--model", str(tiny_checkpoint), "--lora-modules", f"my-lora={tmp_path / 'nope'}")
    assert missing.returncode == 1 and f"my-lora={tmp_path / 'nope'}: no such directory" in missing.stderr


def test_serve_lora_modules_from_the_command_line(tmp_path, tiny_checkpoint, adapters):
    """Only the folder is checked at start: a bad adapter leaves the model and the good one serving."""
    with elmd_serve(tmp_path / "home", "--model", str(tiny_checkpoint), "--backend", "torch", "--lora-modules",
                    f"my-lora={adapters['mlx-lora']}", f"bad-lora={adapters['corrupt-lora']}") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        cards = {card.id: card.parent for card in client.models.list().data}
        assert cards == {tiny_checkpoint.name: None, "my-lora": tiny_checkpoint.name, "bad-lora": tiny_checkpoint.name}
        with pytest.raises(openai.BadRequestError, match="adapters.safetensors"):
            completion(client, "bad-lora")
        assert completion(client, "my-lora") != completion(client, tiny_checkpoint.name)


def test_import_list_serve_and_remove_a_stored_adapter(tmp_path, tiny_checkpoint, adapters):
    home = tmp_path / "home"
    store = home / "data" / "models"
    assert elmd(home, "import", str(tiny_checkpoint), "--name", TINY_MODEL).returncode == 0

    source = tmp_path / "trained"
    shutil.copytree(adapters["mlx-lora"], source)
    shutil.copyfile(source / "adapters.safetensors", source / "0000100_adapters.safetensors")  # mlx-lm's checkpoint
    no_base = elmd(home, "import", str(source), "--adapter-for", "no-such-model", "--name", "my-lora")
    assert no_base.returncode == 1 and "'no-such-model' is not installed" in no_base.stderr, no_base.stderr
    misfit = elmd(home, "import", str(adapters["wider-lora"]), "--adapter-for", TINY_MODEL, "--name", "wide")
    assert misfit.returncode == 1 and "adapters.safetensors: transformer.layers.0.attn" in misfit.stderr, misfit.stderr
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [TINY_MODEL]

    imported = elmd(home, "import", str(source), "--adapter-for", TINY_MODEL, "--name", "my-lora")
    assert imported.returncode == 0, imported.stderr
    assert sorted(p.name for p in (store / "my-lora").iterdir()) == ["adapter_config.json", "adapters.safetensors",
                                                                     "elmd.json"]
    table = elmd(home, "list").stdout
    row = next(line for line in table.splitlines() if line.startswith("my-lora "))
    assert f"LoRA adapter of {TINY_MODEL}" in row
    listed = {m["name"]: m for m in json.loads(elmd(home, "list", "--json").stdout)}
    assert (listed["my-lora"]["adapter_for"], listed[TINY_MODEL]["adapter_for"]) == (TINY_MODEL, None)
    assert f"LoRA adapter of {TINY_MODEL} (lora, rank 8, mlx layout)" in elmd(home, "show", "my-lora").stdout

    app, manager = build_app(store_root=store, backend="torch")
    with serve_app(app, manager) as running:
        client = openai.OpenAI(base_url=running.v1, api_key="unused", max_retries=0)
        cards = {card.id: card.parent for card in client.models.list().data}
        assert cards == {TINY_MODEL: None, "my-lora": TINY_MODEL}
        text = completion(client, "my-lora")
        view = manager.loaded()[TINY_MODEL].with_adapter("my-lora", store / "my-lora")
        assert text == view.complete(PROMPT, ignore_eos=True, **GREEDY) != completion(client, TINY_MODEL)

    assert elmd(home, "rm", TINY_MODEL).returncode == 0
    app, manager = build_app(store_root=store, backend="torch")
    with serve_app(app, manager) as running:
        orphan = httpx.post(f"{running.v1}/completions", json={"model": "my-lora", "prompt": PROMPT, "max_tokens": 1})
        assert orphan.status_code == 404 and f"adapts the model '{TINY_MODEL}', which is not installed" in \
            orphan.json()["error"]["message"]

    removed = elmd(home, "rm", "my-lora")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(elmd(home, "list", "--json").stdout) == []
