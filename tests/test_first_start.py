"""A first start with no kernel build cached: the daemon answers on ATen's kernels while the
native ones compile in the background, then switches its model to them between two
scheduler steps without dropping a request or changing a greedy answer. A real daemon
process with an empty TORCH_EXTENSIONS_DIR but for the lock file a killed build left there;
every wait is on /health, never a fixed sleep."""

from __future__ import annotations

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
