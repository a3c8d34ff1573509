"""/openapi.json tells the truth (issue #31): schemathesis, with every check it has, against
the live daemon, in positive mode (requests the schema allows must not be refused as
invalid) and negative mode (requests it forbids must be refused with a 4xx), plus its
coverage and stateful phases. Every answer's status, content type, headers and body must
be the ones documented, no answer may be a 500, and `Allow` must name the path's methods.

The daemon serves the tiny checkpoint with its context cut to 64 tokens (so a valid
generation is short) beside an empty store in a temporary folder and an empty models.yaml:
`DELETE /api/delete` finds nothing to delete, `POST /api/pull` knows no model to fetch, and
nothing reaches the network."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import serve_app

MODEL = "tiny-openelm"
SEED = 31
MAX_EXAMPLES = 30  # per operation and phase; both modes together take about two minutes on two cores

# Operations whose valid requests may still be refused with 400 for what no schema can say:
# a prompt longer than the model's context, token ids outside its vocabulary, a grammar or
# JSON schema that does not compile, a combination of fields (tool_choice without tools), or a
# model of the other kind (the daemon's one model is a generator: the embeddings routes refuse it).
MODEL_DEPENDENT = ("^(/v1/(chat/completions|completions|responses|messages|messages/count_tokens|embeddings)"
                   "|/api/(chat|generate|embed|embeddings)|/tokenize|/detokenize)$")

CONFIG = f"""
[[operations]]
include-path-regex = "{MODEL_DEPENDENT}"
[operations.checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "429", "5xx"]

# A model given to `elmd serve` as a folder (as here) is not the store's to delete: 400.
[[operations]]
include-path-regex = "^/api/delete$"
[operations.checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "5xx"]
"""


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from elmd.catalog import Catalog
    from elmd.fixtures import write_checkpoint
    from elmd.registry import Registry
    from elmd.server.app import create_app
    from elmd.server.manager import ModelManager
    from elmd.settings import Settings
    from elmd.store import Store

    checkpoint = write_checkpoint(tmp_path_factory.mktemp("schemathesis") / MODEL, shape="tiny", seed=1)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "max_context_length": 64}))
    settings = Settings(backend="torch", keep_alive=-1)
    store = tmp_path_factory.mktemp("schemathesis-store")
    catalog = Catalog(settings, Registry([]), Store(store))
    catalog.pinned = catalog.directory(checkpoint, MODEL)
    manager = ModelManager(settings, catalog)
    app = create_app(settings, manager, preload=MODEL)
    before = _tree_digest(checkpoint)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ELMD_CPU_KERNELS", "aten")  # no native kernel build competing for the two cores
        with serve_app(app, manager) as running:
            running.wait_healthy(what="the tiny model")
            yield running
    assert _tree_digest(checkpoint) == before, "the fuzzed daemon changed the model it serves"
    assert not any(store.iterdir()), "the fuzzed daemon installed something"


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_describes_the_daemon(daemon, mode, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [str(Path(sys.executable).with_name("schemathesis")), "--no-color", "--config-file", str(config), "run",
               f"{daemon.base_url}/openapi.json", "--checks", "all", "--mode", mode, "--seed", str(SEED),
               "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--request-timeout", "30",
               # Hypothesis' health checks (data too large, too much filtering) judge the generator on
               # the large request schemas, not the daemon.
               "--suppress-health-check", "all"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
