"""Nothing leaves the machine (issue 6): `elmd serve` run as a user would, under a guard
that refuses and records any attempt to reach a non-loopback address, loads a model,
answers chats and completions, refuses every request that names a path or a hub
repository, writes its log file, and exits on SIGTERM. The tests then check what was
attempted, what the daemon set for itself, and what the log holds. A second test runs
the daemon inside a network namespace that has only loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from live_daemon import REPO, free_port, stop, wait_until_ready

GUARD = REPO / "tests" / "network_guard.py"
MARKER = "PRIVATE-PROMPT-c0ffee-91d2"  # text that must never reach the log
NOT_SERVABLE = ["openelm-270m-instruct", "apple/OpenELM-270M-Instruct", "../tiny-openelm", "/etc/passwd",
                "~/.ssh/id_rsa", "https://huggingface.co/apple/OpenELM-270M-Instruct"]


@dataclass
class Session:
    model: str
    record: list[dict]
    exit_code: int
    log_file: Path
    log_text: str
    store: Path
    replies: dict[str, httpx.Response]
    refusals: dict[str, httpx.Response]
    completion_texts: list[str]


def daemon_environment(home: Path, port: int) -> dict[str, str]:
    """The caller's environment without elmd's or the hub's settings: the daemon must
    go offline by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ELMD_", "HF_", "TRANSFORMERS_", "DO_NOT_TRACK"))}
    env.update(ELMD_HOME=str(home), ELMD_PORT=str(port), PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="module")
def session(tiny_checkpoint, tmp_path_factory) -> Session:
    root = tmp_path_factory.mktemp("offline")
    record_path, log_file, port = root / "network.jsonl", root / "logs" / "elmd.log", free_port()
    env = daemon_environment(root / "elmd", port)
    command = [sys.executable, str(GUARD), str(record_path), "-m", "elmd", "serve", "--model", str(tiny_checkpoint),
               "--backend", "torch", "--log-file", str(log_file), "--log-level", "debug"]
    url, model = f"http://127.0.0.1:{port}", tiny_checkpoint.name
    with open(root / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_until_ready(url, process, root / "stderr.log")
        user = [{"role": "user", "content": f"Tell me a secret: {MARKER}"}]
        generation = {"max_tokens": 16, "seed": 3, "ignore_eos": True}
        replies = {
            "chat": httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": user, **generation}, timeout=60),
            "stream": httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                 json={"model": model, "messages": user, "stream": True, **generation}),
            "completion": httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": MARKER, **generation},
                                     timeout=60),
            "tokenize": httpx.post(f"{url}/tokenize", json={"model": model, "prompt": MARKER}, timeout=60),
        }
        refusals = {}
        for name in NOT_SERVABLE + [str(tiny_checkpoint), str(tiny_checkpoint.parent)]:
            refusals[name] = httpx.post(f"{url}/v1/chat/completions", json={"model": name, "messages": user}, timeout=60)
            refusals[f"tokenize {name}"] = httpx.post(f"{url}/tokenize", json={"model": name, "prompt": "x"}, timeout=60)
    finally:
        exit_code = stop(process)
    texts = [replies["chat"].json()["choices"][0]["message"]["content"], replies["completion"].json()["choices"][0]["text"]]
    return Session(model, [json.loads(line) for line in record_path.read_text().splitlines()], exit_code, log_file,
                   log_file.read_text(), root / "elmd" / "data" / "models", replies, refusals, texts)


def test_the_guard_catches_what_it_is_meant_to_catch(tmp_path):
    """Without this the other tests could pass with a guard that sees nothing."""
    record = tmp_path / "network.jsonl"
    code = ("import socket\n"
            "for attempt in (lambda: socket.create_connection(('192.0.2.1', 443), timeout=1),\n"
            "                lambda: socket.socket().connect(('192.0.2.1', 443)),\n"
            "                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.0.2.1', 53))):\n"
            "    try:\n        attempt()\n    except OSError:\n        pass\n")
    subprocess.run([sys.executable, str(GUARD), str(record), "-c", code], check=True, timeout=60)
    events = [json.loads(line)["event"] for line in record.read_text().splitlines()]
    assert events == ["socket.getaddrinfo", "socket.connect", "socket.sendto", "exit"]


def test_serving_makes_no_outbound_connection(session):
    for name, reply in session.replies.items():
        assert reply.status_code == 200, f"{name}: {reply.text}"
    assert "data: [DONE]" in session.replies["stream"].text
    attempts = [entry for entry in session.record if entry["event"] != "exit"]
    assert attempts == []


def test_serve_turns_on_offline_mode_itself(session):
    """The daemon was started without HF_HUB_OFFLINE; it sets it (and opts out of
    telemetry) before loading anything."""
    (exit_entry,) = [entry for entry in session.record if entry["event"] == "exit"]
    assert exit_entry["environment"] == {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


def test_a_request_cannot_load_a_path_or_download_a_model(session):
    for name, response in session.refusals.items():
        assert response.status_code == 404, f"{name}: {response.text}"
        assert response.json()["error"]["code"] == "model_not_found"
    assert not session.store.exists() or not [p for p in session.store.iterdir() if not p.name.startswith(".")]
    loads = [line for line in session.log_text.splitlines() if "elmd.server: loaded " in line]
    assert len(loads) == 1 and f"loaded {session.model} " in loads[0]


def test_the_log_file_is_private_and_holds_no_prompt_or_completion_text(session):
    assert session.exit_code == 0
    assert session.log_file.stat().st_mode & 0o777 == 0o600
    assert "POST /v1/chat/completions" in session.log_text  # the log is written, at debug level even
    assert MARKER not in session.log_text
    for text in session.completion_texts:
        assert len(text) >= 12, text  # long enough that finding it would mean it was logged
        assert text not in session.log_text


def test_log_prompts_is_what_puts_prompts_in_the_log(start_server, tiny_checkpoint, caplog):
    """The positive control: the same search finds the text once the operator asks for it."""
    caplog.set_level("INFO", logger="elmd.prompts")
    running = start_server(tiny_checkpoint, log_prompts=True, keep_alive=-1)
    reply = httpx.post(f"{running.v1}/chat/completions", timeout=60, json={
        "model": "tiny-openelm", "messages": [{"role": "user", "content": MARKER}], "max_tokens": 4})
    assert reply.status_code == 200
    deadline = time.monotonic() + 10  # written once the response has gone out
    while len([r for r in caplog.records if r.name == "elmd.prompts"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "elmd.prompts")
    assert MARKER in logged and reply.text in logged


NAMESPACE_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=2)
        isolated = False
    except OSError:
        isolated = True
    from live_daemon import running_daemon
    import httpx
    with running_daemon(Path(sys.argv[2]), Path(sys.argv[3])) as daemon:
        reply = httpx.post(daemon.url + "/v1/chat/completions", timeout=60, json={
            "model": daemon.model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    print(json.dumps({"isolated": isolated, "status": reply.status_code, "body": reply.json()}))
""")


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")),
                    reason="network namespaces need Linux, root, unshare and ip (CI runs as root)")
def test_the_daemon_answers_inside_a_network_namespace_with_only_loopback(tiny_checkpoint, tmp_path):
    result = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, "-c", NAMESPACE_SCRIPT, str(REPO / "tests"), str(tiny_checkpoint), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["isolated"], "the namespace reached a non-loopback address"
    assert outcome["status"] == 200 and outcome["body"]["object"] == "chat.completion"
