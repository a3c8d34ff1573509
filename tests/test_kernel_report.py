"""Which CPU kernels run a model, said where a user looks: GET /health, `elmd status` and the
daemon's load log line; forced off with ELMD_CPU_KERNELS=aten. A real daemon process and the
real CLI."""

from __future__ import annotations

import subprocess
import sys

import time

import httpx
import pytest

from live_daemon import running_daemon

pytestmark = pytest.mark.slow


def elmd(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elmd", *args], env=daemon.env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_health_status_and_log_name_the_forced_aten_path(tiny_checkpoint, tmp_path):
    with running_daemon(tiny_checkpoint, tmp_path, ELMD_CPU_KERNELS="aten") as daemon:
        health = httpx.get(f"{daemon.url}/health").json()
        status = elmd(daemon, "status")
    assert health["cpu_kernels"] == "aten" and not health["cpu_kernels_building"]
    assert "ELMD_CPU_KERNELS=aten" in health["cpu_kernels_reason"]
    assert status.returncode == 0, status.stderr
    assert "CPU kernels: aten (forced by ELMD_CPU_KERNELS=aten)" in status.stdout
    loaded = next(line for line in (tmp_path / "daemon.log").read_text().splitlines() if "loaded tiny-openelm" in line)
    assert "CPU kernels: aten (forced by ELMD_CPU_KERNELS=aten)" in loaded


def test_health_names_the_path_this_machine_runs(tiny_checkpoint, tmp_path):
    """The daemon reports what the kernels module finds here: the native path where the CPU
    and a compiler allow it, else ATen and why."""
    from elmd.engine.kernels import native

    path, why = native.kernel_path()  # built (or found in the cache) here first
    with running_daemon(tiny_checkpoint, tmp_path) as daemon:
        # loading the cached build takes about a second, but a load waits only 5 s for it: on
        # a busy machine the daemon may start on ATen and switch, so wait for the switch
        deadline = time.monotonic() + 300
        while (health := httpx.get(f"{daemon.url}/health").json())["cpu_kernels_building"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        status = elmd(daemon, "status", "--json")
    assert (health["cpu_kernels"], health["cpu_kernels_reason"]) == (path, why)
    assert status.returncode == 0 and f'"cpu_kernels": "{path}"' in status.stdout


def test_no_cpu_model_no_cpu_kernels(start_server):
    server = start_server()
    health = httpx.get(f"{server.base_url}/health").json()
    assert health["status"] == "ok" and health["cpu_kernels"] is None and health["cpu_kernels_reason"] is None


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_the_background_build_and_its_compilers_yield_the_cpus_to_requests():
    """Issue 21: on a first start the kernel build shares two cores with the requests served
    on ATen meanwhile; its thread, and every compiler it starts, run at a lower priority."""
    import os
    import threading

    from elmd.engine.kernels import native

    seen = {}

    def build_thread():
        native._yield_cpus_to_serving()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["compiler"] = int(subprocess.run(["nice"], capture_output=True, text=True, check=True).stdout)

    before = os.getpriority(os.PRIO_PROCESS, 0)
    worker = threading.Thread(target=build_thread)
    worker.start()
    worker.join()
    lowered = min(19, before + native.BUILD_NICENESS)
    assert seen == {"thread": lowered, "compiler": lowered}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the serving threads keep theirs
