"""The model store: names, file references and installs that cannot escape or half-happen."""

from __future__ import annotations

import json
import os

import pytest

from elmd.quant import Quant
from elmd.store import InvalidModelName, ModelNotFound, Store, UnsafeModelFile, write_manifest


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models")


def install(store: Store, name: str, files: dict[str, bytes] | None = None):
    with store.installing(name) as tmp:
        for rel, data in (files or {"config.json": b"{}"}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        write_manifest(tmp, source={"kind": "test"}, revision="abc123", quant=Quant("int4", 32))
    return store.path(name)


@pytest.mark.parametrize("name", ["openelm-270m-instruct", "smollm2-135m-instruct:int4", "a", "m.1_2-3:q4_1"])
def test_valid_names_map_to_a_folder_directly_under_the_root(store, name):
    assert store.path(name).parent == store.root.resolve()
    assert store.path(name).name == name


@pytest.mark.parametrize("name", [
    "../evil", "..", ".", "/etc/passwd", "a/b", "a\\b", "", ".hidden", "-flag", "UPPER", "a:b:c",
    "a:../b", "name\x00", "x" * 129, "a b", "a:",
])  # fmt: skip
def test_names_outside_the_grammar_are_rejected(store, name):
    with pytest.raises(InvalidModelName):
        store.path(name)


def test_a_model_folder_that_is_a_symlink_is_rejected(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    store.root.mkdir(parents=True)
    (store.root / "planted").symlink_to(outside)
    with pytest.raises(InvalidModelName, match="outside the store"):
        store.path("planted")
    assert [m.name for m in store.list()] == []


def test_resolve_file_stays_inside_the_model(store, tmp_path):
    model = install(store, "m", {"config.json": b"{}", "sub/model.safetensors": b"x"})
    (tmp_path / "secret").write_text("secret")
    os.symlink(tmp_path / "secret", model / "escape.safetensors")
    os.symlink(tmp_path, model / "escape-dir")
    os.symlink("config.json", model / "alias.json")

    assert store.resolve_file("m", "sub/model.safetensors") == (model / "sub/model.safetensors").resolve()
    assert store.resolve_file("m", "alias.json") == (model / "config.json").resolve()
    for ref in ["../secret", "sub/../../secret", "/etc/passwd", "escape.safetensors", "escape-dir/secret",
                "sub\\..\\..\\secret", ""]:
        with pytest.raises(UnsafeModelFile):
            store.resolve_file("m", ref)


def test_install_is_atomic_and_cleans_up_after_a_failure(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.installing("m") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            assert not store.exists("m")
            raise RuntimeError("boom")
    assert not store.exists("m")
    assert visible_or_temporary(store) == []


def test_install_refuses_to_replace_unless_asked(store):
    install(store, "m", {"config.json": b"old"})
    with pytest.raises(FileExistsError):
        with store.installing("m"):
            pass
    with store.installing("m", overwrite=True) as tmp:
        (tmp / "config.json").write_bytes(b"new")
    assert (store.path("m") / "config.json").read_bytes() == b"new"
    assert visible_or_temporary(store) == ["m"]


def test_install_sweeps_the_leftovers_of_a_killed_install_of_the_same_name(store):
    store.root.mkdir(parents=True)
    (store.root / ".tmp-m@killed").mkdir()
    (store.root / ".tmp-m2@busy").mkdir()
    install(store, "m")
    assert visible_or_temporary(store) == [".tmp-m2@busy", "m"]


def visible_or_temporary(store: Store) -> list[str]:
    """What the store folder holds besides its lock files."""
    return sorted(n for n in os.listdir(store.root) if not n.startswith(".lock-"))


def test_list_manifest_and_remove(store):
    install(store, "b", {"model.safetensors": b"12345"})
    install(store, "a:int4", {"config.json": b"{}"})
    with store.installing("in-progress"):
        (store.root / "stray-file").write_text("not a model")
        names = [m.name for m in store.list()]
    assert names == ["a:int4", "b"]

    b = store.get("b")
    manifest = store.manifest("b")
    assert b.size_bytes == 5 + len(json.dumps(manifest, indent=2, sort_keys=True)) + 1
    assert manifest["revision"] == "abc123" and manifest["quant"] == "int4-g32"
    assert manifest["files"] == {"model.safetensors": {
        "sha256": "5994471abb01112afcc18159f6cc74b4f511b99806da59b3caf5a9c173cacfc5", "size": 5}}

    store.remove("b")
    assert not store.exists("b")
    with pytest.raises(ModelNotFound):
        store.remove("b")
    assert [m.name for m in store.list()] == ["a:int4", "in-progress"]

