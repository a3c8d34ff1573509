"""A first start with no kernel build cached: the daemon answers on ATen's kernels while the
native ones compile in the background, then switches its model to them between two
scheduler steps without dropping a request or changing a greedy answer. A real daemon
process with an empty TORCH_EXTENSIONS_DIR but for the lock file a killed build left there;
every wait is on /health, never a fixed sleep."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from elmd.engine.kernels import native

from live_daemon import running_daemon

pytestmark = pytest.mark.slow

BUILD_TIMEOUT = 900  # a first build takes about a minute alone, several on a busy 2-core machine


def greedy(url: str, model: str) -> tuple[str, str]:
    body = {"model": model, "prompt": "The first ten minutes", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=120).raise_for_status().json()["choices"][0]
    return choice["text"], choice["finish_reason"]


def leave_a_killed_build(extensions: Path) -> None:
    """What a first start stopped during its kernel build leaves: torch's lock file in the build
    folder of this CPU's best build, which nobody will ever remove."""
    flags = native.cpu_flags()
    for build in native.BUILDS:
        if build.cpu_flags <= flags:
            folder = extensions / native.build_name(build, flags)
            folder.mkdir(parents=True)
            (folder / "lock").touch()
            return


@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_the_daemon_serves_on_aten_while_the_kernels_build_then_switches(tiny_checkpoint, tmp_path):
    leave_a_killed_build(tmp_path / "no-cache")
    with running_daemon(tiny_checkpoint, tmp_path, TORCH_EXTENSIONS_DIR=str(tmp_path / "no-cache")) as daemon:
        health = httpx.get(f"{daemon.url}/health").json()
        if not health["cpu_kernels_building"]:
            pytest.skip(f"no native kernels to build on this CPU: {health['cpu_kernels']} ({health['cpu_kernels_reason']})")
        assert health["cpu_kernels"] == "aten"
        first = greedy(daemon.url, daemon.model)
        assert first[1] == "length"
        # One request per look at /health until the switch: answered on ATen, across the
        # switch (the build competes with them for the CPUs, so not back to back), then after.
        answers, deadline = [], time.monotonic() + BUILD_TIMEOUT
        while httpx.get(f"{daemon.url}/health").json()["cpu_kernels_building"]:
            assert time.monotonic() < deadline, "the kernels did not finish building"
            answers.append(greedy(daemon.url, daemon.model))
            time.sleep(1)
        health = httpx.get(f"{daemon.url}/health").json()
        after = [greedy(daemon.url, daemon.model) for _ in range(2)]
    log = (tmp_path / "daemon.log").read_text()
    assert health["cpu_kernels"] not in ("aten", None), health
    # A first build on this machine quotes the time measured elsewhere; the build it timed is
    # what the next one here will quote.
    assert (f"building CPU kernels for this machine (once; measured at {native.MEASURED_FIRST_BUILD}); "
            "serving meanwhile on ATen") in log
    assert int((tmp_path / "no-cache" / native.BUILD_SECONDS_FILE).read_text()) > native.COMPILED_SECONDS
    assert f"now on the {health['cpu_kernels']} CPU kernels" in log
    assert answers and set(answers) == set(after) == {first}


def test_a_build_quotes_the_last_build_timed_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_extensions_root", tmp_path)
    assert native.build_estimate() == f"measured at {native.MEASURED_FIRST_BUILD}"  # none timed here yet
    (tmp_path / native.BUILD_SECONDS_FILE).write_text("131\n")
    assert native.build_estimate() == "the last build on this machine took 131 s"


def compilers_in(folder: Path) -> list[int]:
    """Processes working in `folder` (ninja and the compilers it starts run in the build folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


SCRIPT = """
from elmd.engine.load import load_engine
engine = load_engine({checkpoint!r}, backend="torch", quant="int8")
print(repr(engine.chat([{{"role": "user", "content": "Hello"}}], max_tokens=8, temperature=0)))
"""


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="looks for the compilers in /proc")
def test_a_script_done_before_the_first_build_exits_cleanly_and_stops_the_compilers(tiny_checkpoint, tmp_path):
    """A script that loads a model and exits while the first kernel build still runs: it exits
    0 (it used to abort one time in three, a daemon thread ended inside torch at interpreter
    exit), and no compiler outlives it. Each run starts from an empty build cache."""
    if not any(build.cpu_flags <= native.cpu_flags() for build in native.BUILDS):
        pytest.skip("no native kernels to build on this CPU")
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")  # the int8 file it stores stays here
    for attempt in range(3):
        extensions = tmp_path / f"extensions-{attempt}"
        run = subprocess.run([sys.executable, "-c", SCRIPT.format(checkpoint=str(checkpoint))],
                             env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "building CPU kernels" in run.stderr  # the build was still running at exit
        deadline = time.monotonic() + 10  # SIGTERM reaches ninja, then its compilers
        while (left := compilers_in(extensions)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"compilers left running: {left}"
