"""Stored quantized weights (elmd/engine/quant_store.py): written once, tensor by tensor;
read without quantizing; one file for every activation dtype; and a load that has to
quantize leaves the process no bigger than a later load of the stored file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from elmd.engine import quant_store, quantize
from elmd.engine.quantize import Int4Scheme, Int8Scheme
from elmd.fixtures import config_for, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny(tiny_checkpoint, tmp_path) -> Path:
    """A writable copy of the tiny checkpoint (stored files go beside the weights)."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny"))


def never_quantize(monkeypatch):
    def refuse(self, w):
        raise AssertionError("quantized while loading")

    for scheme in (Int4Scheme, Int8Scheme):
        monkeypatch.setattr(scheme, "quantize", refuse)


def logits(model, ids=(1, 5, 9, 200, 31)) -> torch.Tensor:
    tokens = torch.tensor([ids])
    return model(tokens, torch.arange(len(ids))[None])[0].float()


@pytest.mark.parametrize("quant", ["int8", "int4", "bf16"])
def test_a_load_never_quantizes_when_the_stored_file_is_there(tiny, monkeypatch, quant):
    first = quant_store.load(tiny, quant, torch.float32, "cpu")  # writes elmd-<quant>.safetensors
    stored = quant_store.stored_path(tiny, quant)
    written = stored.stat().st_mtime_ns
    never_quantize(monkeypatch)
    again = quant_store.load(tiny, quant, torch.float32, "cpu")
    assert stored.stat().st_mtime_ns == written
    assert torch.equal(logits(first), logits(again))


def test_int4_and_int4_g32_are_one_stored_file(tiny, monkeypatch):
    """Issue 22: the two names of one quantization used to write two identical files."""
    quant_store.load(tiny, "int4", torch.float32, "cpu")
    never_quantize(monkeypatch)
    quant_store.load(tiny, "int4-g32", torch.float32, "cpu")
    assert [p.name for p in tiny.glob("elmd-*.safetensors")] == ["elmd-int4-g32.safetensors"]


def test_the_stored_file_is_the_same_whatever_dtype_loaded_first(tiny, tmp_path):
    """Issue 16: a first load in bf16 used to store bf16 norms, so later float32 loads lost the
    native plan (and changed results) without a word."""
    other = Path(shutil.copytree(tiny, tmp_path / "other"))
    in_bf16 = quant_store.load(tiny, "int4", torch.bfloat16, "cpu")
    assert in_bf16.transformer.norm.weight.dtype == torch.bfloat16
    quant_store.load(other, "int4", torch.float32, "cpu")
    stored = [load_file(str(quant_store.stored_path(d, "int4"))) for d in (tiny, other)]
    assert stored[0].keys() == stored[1].keys() and all(torch.equal(stored[0][k], stored[1][k]) for k in stored[0])
    in_float32 = quant_store.load(tiny, "int4", torch.float32, "cpu")
    assert all(p.dtype == torch.float32 for name, p in in_float32.named_parameters() if "norm" in name)
    fresh = quant_store.load(other, "int4", torch.float32, "cpu")
    assert torch.equal(logits(in_float32), logits(fresh))


def test_a_file_of_the_older_format_is_written_again(tiny):
    """Files from before the format key held norms in the first load's dtype."""
    stored = quant_store.stored_path(tiny, "int8")
    quant_store.write(tiny, "int8")
    state = load_file(str(stored))
    save_file(state, str(stored), metadata={quantize.METADATA_KEY: quantize.parse_quant("int8", True).to_json()})
    assert quantize.stored_spec(stored) is None  # no format key: not trusted
    quant_store.load(tiny, "int8", torch.float32, "cpu")
    assert quantize.stored_spec(stored) == quantize.parse_quant("int8", True)


RSS_PROBE = """
import json, sys, psutil, torch
from elmd.engine import quant_store
model = quant_store.load(sys.argv[1], sys.argv[2], torch.float32, "cpu")
model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])  # the kernels prepared, as serving would
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rss": psutil.Process().memory_info().rss, "peak": peak,
                  "stored": quant_store.stored_path(sys.argv[1], sys.argv[2]).exists()}))
"""


def rss_after_load(model_dir: Path, quant: str) -> dict:
    result = subprocess.run([sys.executable, "-c", RSS_PROBE, str(model_dir), quant], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two loads in children, each may quantize the 270M shape on a busy machine
def test_resident_memory_after_a_first_load_that_quantizes_is_that_of_a_later_load(tmp_path):
    """A 270M-shaped model cut to 2 layers (45M parameters, 180 MB in float32) at int4:
    quantizing in the daemon used to keep the float weights' peak (the whole 270M at int4:
    1,230 MB after the first load, 462 MB after later ones). The peak (VmHWM) is compared
    too: quantizing in this process, even tensor by tensor, would raise it by the float
    embedding's 164 MB at least (measured here: the old float-model-then-quantize load's RSS
    alone did not show it on this machine, so the peak is what proves the float weights
    never entered the loading process)."""
    layers = 2
    full = config_for("270M")
    cut = {"num_transformer_layers": layers, **{key: full[key][:layers] for key in
                                              ("num_query_heads", "num_kv_heads", "ffn_multipliers")}}
    model_dir = write_checkpoint(tmp_path / "m", "270M", seed=0, dtype="bfloat16", config_overrides=cut)
    first = rss_after_load(model_dir, "int4")
    later = rss_after_load(model_dir, "int4")
    assert first["stored"] and later["stored"]
    print(f"RSS after the first load {first['rss'] / 1e6:.0f} MB, later {later['rss'] / 1e6:.0f} MB; "
          f"peak {first['peak'] / 1e6:.0f} MB, later {later['peak'] / 1e6:.0f} MB")
    assert first["rss"] <= 1.15 * later["rss"]
    assert first["peak"] <= 1.15 * later["peak"]


def path_taken(engine) -> dict:
    """What decides the speed class: the activation dtype, whether the native plan runs, and
    each layer's module type and tensor dtypes."""
    model = engine.backend.model
    return {"dtype": engine.backend.info.dtype, "quant": engine.backend.info.quant,
            "native_plan": engine.backend.runner.native_plan is not None,
            "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
            "tensors": {name: t.dtype for name, t in model.state_dict().items()}}


@pytest.mark.parametrize("quant", ["int4", "none"])
def test_bf16_on_the_cpu_runs_the_default_path_with_one_warning(tiny, quant, caplog):
    """Issue 16: `--dtype bfloat16` skipped the native plan; and a first bf16 load stored bf16
    norms that slowed later default loads. Loaded bf16 first, then by default: same path,
    same logits."""
    from elmd.engine.load import load_engine

    ids = [1, 5, 9, 200, 31, 7]
    with caplog.at_level("WARNING", logger="elmd.engine"):
        bf16 = load_engine(tiny, backend="torch", dtype="bfloat16", quant=quant)
    warnings = [r for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(warnings) == 1
    try:
        bf16_path, bf16_scores = path_taken(bf16), bf16.score(ids, 5)
    finally:
        bf16.close()
    default = load_engine(tiny, backend="torch", quant="bf16" if quant == "none" else quant)
    try:
        default_path, default_scores = path_taken(default), default.score(ids, 5)
    finally:
        default.close()
    assert bf16_path == default_path and bf16_path["dtype"] == "float32"
    for ours, theirs in zip(bf16_scores, default_scores):
        assert ours.token_id == theirs.token_id and ours.logprob == pytest.approx(theirs.logprob, abs=1e-5)
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
