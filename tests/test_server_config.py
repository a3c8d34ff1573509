"""models.yaml (shipped in the package, overridden by the user's) and the daemon's settings
(flags > ELMD_* > config.yaml > defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest

from elmd.registry import HubSource, PackageSource, Registry, RegistryError
from elmd.settings import DEFAULT_PORT, Settings, parse_duration

REPO = Path(__file__).resolve().parents[1]
OPENELM = ["openelm-270m-instruct", "openelm-450m-instruct", "openelm-1.1b-instruct", "openelm-3b-instruct"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ELMD_HOME", str(tmp_path))
    (tmp_path / "config").mkdir()
    return tmp_path


def test_shipped_registry(home):
    registry = Registry.load()
    assert [e.id for e in registry] == [*OPENELM, "smollm2-135m-instruct", "all-minilm"]
    for model_id, hub in zip(OPENELM, ["270M", "450M", "1_1B", "3B"]):
        entry = registry.get(model_id)
        assert entry.context_length == 2048
        assert entry.sampling == {"repetition_penalty": 1.2} and entry.chat_template is None
        assert entry.source_for("torch").weights == HubSource(hub=f"apple/OpenELM-{hub}-Instruct")
        assert entry.source_for("torch").tokenizer == HubSource(hub=f"mlx-community/OpenELM-{hub}-Instruct")
        assert entry.source_for("mlx").weights == HubSource(hub=f"mlx-community/OpenELM-{hub}-Instruct")
    offline = registry.get("smollm2-135m-instruct").source_for("torch").weights
    assert isinstance(offline, PackageSource) and offline.locate().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    embedder = registry.get("all-minilm")
    assert embedder.kind == "embedding" and not embedder.matryoshka and embedder.context_length == 256
    assert (embedder.source_for("torch").weights.locate() / "modules.json").is_file()


def test_top_level_models_yaml_is_the_packaged_file():
    assert (REPO / "models.yaml").resolve() == (REPO / "elmd" / "models.yaml").resolve()


def test_user_file_adds_and_overrides(home):
    (home / "config" / "models.yaml").write_text(
        "models:\n"
        "  - id: openelm-270m-instruct\n"
        "    architecture: openelm\n"
        "    context_length: 1024\n"
        "    sampling: {temperature: 0.2}\n"
        "    source: {weights: {hub: me/fork}, tokenizer: {hub: me/fork}}\n"
        "  - id: my-model\n"
        "    architecture: llama\n"
        "    context_length: 4096\n"
        "    source: {weights: {hub: me/mine}, tokenizer: {hub: me/mine}}\n"
    )
    registry = Registry.load()
    assert registry.get("openelm-270m-instruct").context_length == 1024
    assert registry.get("openelm-270m-instruct").sampling == {"temperature": 0.2}
    assert registry.get("my-model").source.weights.hub == "me/mine"
    assert "openelm-3b-instruct" in registry


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("models: [", "not valid YAML"),
        ("models: {a: 1}", "a list under 'models'"),
        ("models:\n  - id: ../escape\n    architecture: openelm\n    context_length: 1\n"
         "    source: {weights: {hub: a/b}, tokenizer: {hub: a/b}}\n", "model ../escape"),
        ("models:\n  - id: ok\n    context_length: 0\n"
         "    source: {weights: {hub: a/b}, tokenizer: {hub: a/b}}\n", "model ok"),
        ("models:\n  - id: typo\n    architecture: llama\n    context_length: 1\n    sampling: {temprature: 0.2}\n"
         "    source: {weights: {hub: a/b}, tokenizer: {hub: a/b}}\n", "temprature"),
        ("models:\n  - id: hot\n    architecture: llama\n    context_length: 1\n    sampling: {temperature: 9}\n"
         "    source: {weights: {hub: a/b}, tokenizer: {hub: a/b}}\n", "temperature"),
    ],
)
def test_a_bad_user_file_is_reported_with_its_path(home, text, fragment):
    user_file = home / "config" / "models.yaml"
    user_file.write_text(text)
    with pytest.raises(RegistryError) as excinfo:
        Registry.load()
    assert str(user_file) in str(excinfo.value) and fragment in str(excinfo.value)


def test_settings_precedence(home, monkeypatch):
    assert Settings().host == "127.0.0.1" and Settings().port == DEFAULT_PORT
    assert DEFAULT_PORT not in (11434, 8080, 1234, 8000)
    (home / "config" / "config.yaml").write_text("port: 9001\nkeep_alive: 10m\nmax_queued_requests: 3\n")
    assert (Settings().port, Settings().keep_alive, Settings().max_queued_requests) == (9001, 600.0, 3)
    monkeypatch.setenv("ELMD_PORT", "9002")
    monkeypatch.setenv("ELMD_KEEP_ALIVE", "-1")
    assert (Settings().port, Settings().keep_alive) == (9002, None)
    assert Settings(port=9003).port == 9003


@pytest.mark.parametrize(
    "value, seconds",
    [(0, 0.0), (30, 30.0), ("45", 45.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25),
     (-1, None), ("-1", None), ("-5m", None)],
)
def test_keep_alive_durations_as_ollama_accepts_them(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "1d", True])
def test_bad_durations_are_refused(value):
    with pytest.raises(ValueError):
        parse_duration(value)
