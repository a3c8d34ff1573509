"""A real daemon for tests that talk to it from outside: `python -m elmd serve` in its own
process (its own session, stdin from /dev/null: no TTY) on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    url: str
    model: str
    process: subprocess.Popen
    env: dict[str, str]  # an environment in which `elmd` finds this daemon


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the daemon did not become ready in {timeout}s:\n{log_path.read_text()}")


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, as launchd and systemd stop a service; the exit status it gave."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@contextmanager
def running_daemon(checkpoint: Path, root: Path, **extra_env: str) -> Iterator[Daemon]:
    """Serve `checkpoint` (its folder name is the model id) with ELMD_HOME = root/elmd and
    `extra_env`; its log is root/daemon.log."""
    with _serve(["--model", str(checkpoint), "--backend", "torch"], checkpoint.name, root, 120, extra_env) as daemon:
        yield daemon


OFFLINE_MODEL = "smollm2-135m-instruct"
KERNEL_BUILD_TIMEOUT_S = 600


@contextmanager
def offline_daemon(root: Path, **extra_env: str) -> Iterator[Daemon]:
    """`elmd serve` as the README starts it (no --model: the offline model, converted on this
    start into ELMD_HOME = root/elmd), once its CPU kernels are built, so that it answers on
    the path users get from then on."""
    with _serve([], OFFLINE_MODEL, root, 600, extra_env) as daemon:
        wait_for_cpu_kernels(daemon)
        yield daemon


def wait_for_cpu_kernels(daemon: Daemon) -> None:
    """Until a first start's background build of the native CPU kernels has ended."""
    deadline = time.monotonic() + KERNEL_BUILD_TIMEOUT_S
    while httpx.get(f"{daemon.url}/health", timeout=10).json().get("cpu_kernels_building"):
        assert time.monotonic() < deadline, "the daemon's CPU kernels did not finish building"
        time.sleep(1)


@contextmanager
def _serve(arguments: list[str], model: str, root: Path, ready_timeout: float, extra_env: dict[str, str]):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELMD_")}
    env.update(ELMD_HOME=str(root / "elmd"), ELMD_PORT=str(port), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", **extra_env)
    log_path = root / "daemon.log"
    root.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "elmd", "serve", *arguments], env=env,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log_path, timeout=ready_timeout)
        yield Daemon(url, model, process, env)
    finally:
        if process.poll() is None:
            stop(process)
