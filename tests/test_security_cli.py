"""The API key from the command line (issue 6): `elmd serve` refuses to listen beyond
loopback without a key and says how to set one; `elmd key` makes a 0600 key file that
the daemon then enforces; ELMD_API_KEY works too; a key file others can read is refused."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from live_daemon import REPO, free_port, stop, wait_until_ready


def environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELMD_")}
    env.update(ELMD_HOME=str(home), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **extra)
    return env


def elmd(*args: str, env: dict[str, str], umask: int | None = None) -> subprocess.CompletedProcess:
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "elmd", *args], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec)


@contextmanager
def serving(checkpoint: Path, env: dict[str, str], *args: str):
    port = free_port()
    log = Path(env["ELMD_HOME"]) / f"serve-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "elmd", "serve", "--model", str(checkpoint), "--backend",
                                    "torch", "--port", str(port), *args], env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log)
        yield url
    finally:
        assert stop(process) == 0


def test_serve_listens_on_loopback_only_by_default(tmp_path, tiny_checkpoint):
    with serving(tiny_checkpoint, environment(tmp_path)) as url:
        port = int(url.rsplit(":", 1)[1])
        listening = [c.laddr for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and all(ipaddress.ip_address(address.ip).is_loopback for address in listening), listening


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_serving_beyond_loopback_without_a_key_is_refused_with_directions(tmp_path, host):
    result = elmd("serve", "--host", host, env=environment(tmp_path))
    assert result.returncode == 2
    assert f"refusing to listen on {host} without an API key" in result.stderr
    assert "ELMD_API_KEY" in result.stderr and "elmd key" in result.stderr


def test_elmd_key_creates_a_private_key_file_whatever_the_umask(tmp_path):
    env = environment(tmp_path)
    created = elmd("key", env=env, umask=0)
    assert created.returncode == 0, created.stderr
    key_file = Path(elmd("key", "--path", env=env).stdout.strip())
    assert key_file.parent == tmp_path / "config"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text().strip() == created.stdout.strip() == elmd("key", env=env).stdout.strip()
    replaced = elmd("key", "--new", env=env, umask=0).stdout.strip()
    assert replaced != created.stdout.strip() and key_file.read_text().strip() == replaced
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_the_key_file_guards_a_daemon_on_all_interfaces(tmp_path, tiny_checkpoint):
    env = environment(tmp_path)
    key = elmd("key", env=env).stdout.strip()
    with serving(tiny_checkpoint, env, "--host", "0.0.0.0") as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer not-it"}).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    os.chmod(tmp_path / "config" / "api_key", 0o644)
    refused = elmd("serve", "--model", str(tiny_checkpoint), env=env)
    assert refused.returncode == 2 and "chmod 600" in refused.stderr


def test_elmd_api_key_takes_precedence_over_the_key_file(tmp_path, tiny_checkpoint):
    env = environment(tmp_path)
    file_key = elmd("key", env=env).stdout.strip()
    with serving(tiny_checkpoint, {**env, "ELMD_API_KEY": "from-the-environment"}) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-the-environment"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {file_key}"}).status_code == 401
