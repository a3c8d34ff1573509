"""README.md's code blocks, as written, against a live daemon on the offline model.

The blocks are parsed from the real README at collection time, so a changed README is what
runs. The daemon is `elmd serve` at its defaults (the offline model, converted on this
start into a throwaway ELMD_HOME) on a free port. The blocks name `127.0.0.1:8356`, the
default address; that one string is replaced by the live daemon's address in each block's
text before it runs, and nothing else is changed. Python blocks run in this venv's python,
sh blocks in bash with this venv's bin first on PATH; each must exit 0 and print something.

A block that cannot run here is in SKIPPED, keyed by a line only it has, with the reason.
A block that is neither run nor skipped fails the test, so a new README block cannot go
untested silently; a SKIPPED key that matches no block fails too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

import pytest
from live_daemon import REPO, Daemon, offline_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a first CPU kernel build takes minutes

README = REPO / "README.md"
README_ADDRESS = "127.0.0.1:8356"
RUNNABLE = {"python", "sh"}
BLOCK_TIMEOUT_S = 120  # every block together takes about a minute on a busy 2-core machine

SKIPPED = {
    # Installing the package: the test already runs in the installed venv.
    "python3 -m venv .venv && .venv/bin/pip install -e . &&": "installs the package",
    # ... and the whole test suite, this file included.
    ".venv/bin/python -m pytest -q -ra": "installs the package and runs every test",
    # What `elmd status` printed on a busy machine: output shown as text, not a command.
    "$ elmd status": "shows output",
    # Prometheus' configuration, not a command.
    "job_name: elmd": "a Prometheus configuration",
    # The hub is unreachable from where the tests run, and pulls take minutes.
    "elmd pull openelm-270m-instruct      #": "downloads from the Hugging Face hub",
    # A launchd agent or systemd --user unit: changes the machine's login session.
    "elmd agent install --model openelm-270m-instruct": "installs a launchd/systemd service",
    # Benchmarks: many minutes each, and they start their own daemons.
    "python benchmarks/bench.py           #": "benchmarks that run for many minutes",
    # Builds llama.cpp with GCC 12's header patched (minutes), then benchmarks against it.
    "mkdir -p /tmp/amxfix": "builds llama.cpp, then benchmarks",
    # LoRA adapters: mlx-lm trains on a Mac; the adapter's base comes from the hub.
    "mlx_lm.lora --model mlx-community/OpenELM-270M-Instruct": "fine-tunes with mlx-lm, then serves a hub model",
    'reply = client.chat.completions.create(model="my-lora"': "needs a daemon serving a trained adapter",
    "elmd import ./adapters --adapter-for": "needs a trained adapter and its base from the hub",
    # The repository's layout, not a command.
    "elmd/engine/    the engine:": "a directory listing",
}


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # where it starts in README.md

    def __str__(self) -> str:
        first = next((s for s in self.text.splitlines() if s.strip()), "")
        return f"README.md:{self.line} {first[:40]}"

    def skip_reason(self) -> str | None:
        reasons = [reason for key, reason in SKIPPED.items() if key in self.text]
        assert len(reasons) <= 1, f"{self}: more than one SKIPPED key matches"
        return reasons[0] if reasons else None


def readme_blocks() -> list[Block]:
    """Every fenced block of README.md with its language (empty for a plain fence)."""
    text = README.read_text()
    return [Block(m["language"], m["body"], text.count("\n", 0, m.start()) + 1)
            for m in re.finditer(r"^```(?P<language>\w*)\n(?P<body>.*?)^```$", text, re.M | re.S)]


BLOCKS = readme_blocks()
TO_RUN = [b for b in BLOCKS if b.skip_reason() is None and b.language in RUNNABLE]


def test_every_block_is_run_or_skipped_for_a_stated_reason():
    unaccounted = [str(b) for b in BLOCKS if b.skip_reason() is None and b.language not in RUNNABLE]
    assert not unaccounted, f"README blocks neither run nor in SKIPPED: {unaccounted}"
    stale = [key for key in SKIPPED if not any(key in b.text for b in BLOCKS)]
    assert not stale, f"SKIPPED keys no README block has any more: {stale}"
    assert len(TO_RUN) >= 6  # the Talk to it, structured output, tools, Responses and Ollama examples


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    """The offline model's daemon once its CPU kernels are built: the engine block then loads
    them from the cache. A script that exits while its own process still builds them aborts
    (SIGABRT) after its answer, an engine bug of its own, not the README's."""
    with offline_daemon(tmp_path_factory.mktemp("readme-daemon")) as daemon:
        yield daemon


@pytest.mark.parametrize("block", TO_RUN, ids=str)
def test_block_runs_as_written(block: Block, daemon: Daemon, tmp_path):
    assert README_ADDRESS in block.text or "127.0.0.1" not in block.text, "a block names another address"
    text = block.text.replace(README_ADDRESS, daemon.url.removeprefix("http://"))
    command = [sys.executable, "-c", text] if block.language == "python" else ["bash", "-e", "-c", text]
    done = subprocess.run(command, env=daemon.env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{block} printed nothing:\n{done.stderr}"
