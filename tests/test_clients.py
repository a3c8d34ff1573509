"""The example programs in clients/ run, unchanged, against a live daemon process: Python
with the official openai SDK, curl, and Node with the official openai, ollama and @anthropic-ai/sdk npm
packages. The
tiny model's answers are gibberish, so the checks are about the stream, not the words."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from live_daemon import REPO, running_daemon

pytestmark = pytest.mark.slow

CLIENTS = REPO / "clients"
NODE_CLIENT = CLIENTS / "node"
NETWORK_ERRORS = re.compile(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|network", re.I)


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint, tmp_path_factory):
    with running_daemon(tiny_checkpoint, tmp_path_factory.mktemp("clients-daemon")) as running:
        yield running


def client_env(daemon, **extra: str) -> dict[str, str]:
    """What a user sets to point a client at the daemon."""
    return {**daemon.env, "ELMD_URL": daemon.url, "ELMD_MAX_TOKENS": "16", **extra}


def run_client(command: list[str], env: dict[str, str], cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_python_openai_sdk_client(daemon):
    result = run_client([sys.executable, str(CLIENTS / "python_chat.py"), "Why is the sky blue?"], client_env(daemon))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_curl_client_streams_server_sent_events(daemon):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    # quotes, a backslash, a tab and a newline: the script must still send valid JSON
    question = 'Say "hi" \\ then\ta second\nline'
    result = run_client(["sh", str(CLIENTS / "curl.sh"), question], client_env(daemon))
    assert result.returncode == 0, result.stdout + result.stderr

    events = [line.removeprefix("data: ") for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == daemon.model for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_curl_client_fails_loudly_on_an_error(daemon):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    result = run_client(["sh", str(CLIENTS / "curl.sh"), "hi"], client_env(daemon, ELMD_MODEL="no-such-model"))
    assert result.returncode != 0
    assert "model_not_found" in result.stdout


@pytest.fixture(scope="module")
def node_client() -> None:
    """The Node clients with their dependencies (the official `openai` and `ollama` packages) installed."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are not installed")
    if all((NODE_CLIENT / "node_modules" / package).is_dir() for package in ("openai", "ollama", "@anthropic-ai/sdk")):
        return
    install = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    if install.returncode != 0 and NETWORK_ERRORS.search(install.stdout + install.stderr):
        pytest.skip(f"npm cannot reach its registry to install the clients: {install.stderr.strip()[-300:]}")
    assert install.returncode == 0, install.stdout + install.stderr


def test_node_openai_package_client(daemon, node_client):
    result = run_client(["node", "chat.mjs", "Why is the sky blue?"], client_env(daemon), cwd=NODE_CLIENT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_node_ollama_package_client(daemon, node_client):
    result = run_client(["node", "ollama_chat.mjs", "Why is the sky blue?"], client_env(daemon), cwd=NODE_CLIENT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_node_anthropic_package_client(daemon, node_client):
    result = run_client(["node", "anthropic_chat.mjs", "Why is the sky blue?"], client_env(daemon), cwd=NODE_CLIENT)
    assert result.returncode == 0, result.stderr
    text, _, summary = result.stdout.rstrip("\n").rpartition("\n")
    assert text.strip()
    assert re.fullmatch(r"\[(end_turn|max_tokens), \d+ tokens\]", summary), summary
