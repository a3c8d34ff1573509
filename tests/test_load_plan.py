"""The typed load plan (elmd.quant, elmd.engine.plan, the catalog's resolver): a quantization
named once means one thing on its way to the kernels, and each backend gets only its options."""

from __future__ import annotations

import logging

import pytest

from elmd.catalog import Catalog
from elmd.engine.plan import MLXOptions, TorchOptions, plan_load
from elmd.quant import Quant
from elmd.registry import ModelEntry, Registry
from elmd.settings import Settings
from elmd.store import Store, write_manifest

SOURCE = {"weights": {"hub": "a/b"}, "tokenizer": {"hub": "a/b"}}


@pytest.mark.parametrize("spelling, torch, mlx", [
    ("none", Quant(), Quant()),
    ("bf16", Quant("bf16"), Quant("bf16")),
    ("int8", Quant("int8"), Quant("int8")),
    ("int4", Quant("int4", 32), Quant("int4", 64)),  # each backend's default group, written out
    ("int4-g32", Quant("int4", 32), Quant("int4", 32)),
    ("int4-g128", Quant("int4", 128), Quant("int4", 128)),
])
def test_every_spelling_parses_to_one_concrete_quant_per_backend(spelling, torch, mlx):
    assert Quant.parse(spelling, "torch") == torch and Quant.parse(spelling, "mlx") == mlx
    for quant in (torch, mlx):
        assert Quant.parse(str(quant), "mlx") == Quant.parse(str(quant), "torch") == quant  # str is unambiguous


@pytest.mark.parametrize("bad", ["int3", "int4-g48", "q4_0", "", "int4-g"])
def test_unknown_quantizations_are_refused(bad):
    with pytest.raises(ValueError, match="unknown quantization"):
        Quant.parse(bad, "torch")


def test_the_plan_writes_each_backends_rules_out():
    torch = plan_load("torch", "auto", "int4", device="cpu", slots=4)
    assert (torch.backend, torch.device, torch.quant) == ("torch", "cpu", Quant("int4", 32))
    assert torch.options == TorchOptions(device="cpu", slots=4)
    mlx = plan_load("mlx", "auto", "int4")
    assert mlx.quant == Quant("int4", 64) and mlx.options == MLXOptions()
    bf16 = plan_load("mlx", "auto", "bf16")  # MLX runs bf16 weights as bf16 activations
    assert (bf16.dtype, bf16.quant) == ("bfloat16", Quant())


def test_bf16_activations_on_the_cpu_become_float32_beside_bf16_weights():
    plan = plan_load("torch", "bfloat16", "none", device="cpu")
    assert (plan.dtype, plan.quant) == ("float32", Quant("bf16"))
    assert plan_load("torch", "bfloat16", "int8", device="cpu").quant == Quant("int8")


def test_a_torch_only_option_given_to_mlx_is_announced(caplog):
    with caplog.at_level(logging.WARNING, logger="elmd.engine.plan"):
        plan = plan_load("mlx", name="m", cuda_graphs=True, speculation=True, draft_quant="int8", prefix_cache_bytes=0)
    assert caplog.records == []  # defaults, and a draft quant without a draft: nothing to say
    assert plan.options == MLXOptions(prefix_cache_bytes=0)
    with caplog.at_level(logging.WARNING, logger="elmd.engine.plan"):
        plan_load("mlx", name="m", kv_cache_dtype="float16", compile_decode=True)
    assert [r.getMessage() for r in caplog.records] == [
        "m: compile_decode, kv_cache_dtype are only the PyTorch backend's; MLX serves without"]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("ELMD_HOME", str(tmp_path))
    (tmp_path / "config").mkdir()
    return Store(tmp_path / "models")


def install(store: Store, name: str, **manifest) -> None:
    with store.installing(name) as tmp:
        write_manifest(tmp, source={"kind": "test"}, revision=None, files={}, **manifest)


def entry(model_id: str, **fields) -> ModelEntry:
    return ModelEntry.model_validate({"id": model_id, "context_length": 64, "source": SOURCE, **fields})


@pytest.mark.parametrize("backend, group", [("torch", 32), ("mlx", 64)])
def test_settings_then_the_manifest_then_models_yaml_decide_the_quant(store, backend, group):
    registry = Registry([entry("a", default_quant="int8"), entry("b", default_quant="int4"), entry("c")])
    install(store, "a", quant=Quant("int4", 32), default_quant="int4-g128")
    install(store, "b")
    install(store, "c")
    catalog = Catalog(Settings(backend=backend), registry, store)
    quants = {name: catalog.find(name).quant for name in "abc"}
    assert quants == {"a": Quant("int4", 128), "b": Quant("int4", group), "c": Quant()}
    assert catalog.find("b").backend == backend
    forced = Catalog(Settings(backend=backend, quant="int8"), registry, store)
    assert {forced.find(name).quant for name in "abc"} == {Quant("int8")}


def test_the_manifest_records_the_stored_quant_in_the_same_type(store):
    install(store, "m", quant=Quant("int4", 64), default_quant="int4")
    stored = store.get("m")
    assert stored.manifest["quant"] == "int4-g64" and stored.quant == Quant("int4", 64)
    install(store, "old", quant="none")  # what every install wrote before
    assert store.get("old").quant == Quant()


def test_the_draft_is_read_from_the_store_when_the_model_loads_not_per_request(store, monkeypatch):
    registry = Registry([entry("big", draft="small"), entry("small")])
    install(store, "big")
    install(store, "small", default_quant="int8")
    catalog = Catalog(Settings(backend="torch"), registry, store)
    reads = []
    get, exists = store.get, store.exists
    monkeypatch.setattr(store, "get", lambda name: reads.append(name) or get(name))
    monkeypatch.setattr(store, "exists", lambda name: reads.append(name) or exists(name))
    specs = [catalog.find("big") for _ in range(3)]
    assert "small" not in reads and {spec.draft for spec in specs} == {"small"}
    draft = catalog.draft(specs[0])
    assert draft.path == get("small").path and draft.quant == Quant("int8")
    assert catalog.draft(catalog.find("small")) is None
    assert Catalog(Settings(backend="torch", draft="none"), registry, store).find("big").draft is None
    assert Catalog(Settings(backend="torch", speculation=False), registry, store).find("big").draft is None
