"""No arbitrary loading (issue 6): a request's `model` resolves only to the model the
daemon was started with or to one installed in the store, never to a path, a symlink
that leads out of the store, or a hub repository."""

from __future__ import annotations

import httpx
import pytest

from elmd.store import Store

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def link_out_of_the_store(tiny_checkpoint):
    """A store entry that is a symlink to a real model folder outside the store."""
    link = Store().root / "linked"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(tiny_checkpoint, target_is_directory=True)
    yield link.name
    link.unlink()


def test_a_symlink_in_the_store_is_not_a_model(server, link_out_of_the_store):
    response = httpx.post(f"{server.v1}/chat/completions", json={"model": link_out_of_the_store, "messages": USER})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert link_out_of_the_store not in [m["id"] for m in httpx.get(f"{server.v1}/models").json()["data"]]


@pytest.mark.parametrize("name", ["../tiny-openelm", "..", ".", "/", "apple/OpenELM-270M-Instruct", "openelm-270m-instruct",
                                  "tiny-openelm/../tiny-openelm", "C:\\models\\x", "tiny-openelm\x00", "~"])
def test_model_names_that_are_paths_or_repos_are_not_found(server, tiny_checkpoint, name):
    for model in (name, str(tiny_checkpoint), str(tiny_checkpoint.parent)):
        chat = httpx.post(f"{server.v1}/chat/completions", json={"model": model, "messages": USER})
        assert chat.status_code == 404, chat.text
        if model.strip("/"):  # ("/v1/models//" is the list, redirected)
            encoded = "".join(f"%{byte:02X}" for byte in model.encode())  # every byte, dots and slashes too
            card = httpx.get(f"{server.v1}/models/{encoded}")
            assert card.status_code == 404, card.text
    assert httpx.get(f"{server.base_url}/health").json()["loading"] == []
