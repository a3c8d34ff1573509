"""A wheel carries the native CPU kernels compiled (build_backend/elmd_build.py): installed
from it, elmd runs them from its first token with no C++ compiler, and builds nothing.

The wheel is built from a copy of the sources, so its compiled kernels stay out of this
checkout (where the other tests build theirs at first use, as an editable install does)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from elmd.engine.kernels import native

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build_backend"))
import elmd_build  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_the_backend_compiles_against_the_torch_that_pyproject_pins():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"{elmd_build.TORCH}; sys_platform != 'darwin'" in dependencies


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or native.load() is None,
                    reason="needs an x86-64 CPU whose kernels build here")
def test_a_wheel_install_runs_the_native_kernels_without_a_compiler(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("elmd", "build_backend"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "prebuilt"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                            str(source)], capture_output=True, text=True, timeout=2000)
    assert built.returncode == 0, built.stderr[-4000:]
    (wheel,) = (tmp_path / "wheel").glob("elmd-*.whl")
    carried = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/kernels/prebuilt/" in n}
    flags = native.cpu_flags()
    expected = {f"{native.build_name(b, frozenset())}.so" for b in native.BUILDS}
    expected.add(f"{native.build_name(native.BUILDS[-1], frozenset({'avx_vnni'}))}.so")
    assert carried == expected

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-4000:]
    code = """
import json, elmd
from torch import nn
from elmd.engine import quantize
from elmd.engine.kernels import native
path, why = native.kernel_path()
layer = quantize.QuantizedLinear.from_float(nn.Linear(64, 32, bias=False), quantize.parse_quant("int8"))
print(json.dumps({"elmd": elmd.__file__, "path": path, "why": why, "kernel": layer.prepare()}))
"""
    empty = tmp_path / "extensions"
    env = {k: v for k, v in os.environ.items() if k != "ELMD_CPU_KERNELS"}
    env.update(PYTHONPATH=str(site), CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(empty))
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-4000:]
    got = json.loads(ran.stdout.splitlines()[-1])
    best = next(b.path for b in native.BUILDS if b.cpu_flags <= flags)
    assert Path(got["elmd"]).is_relative_to(site)
    assert got == {**got, "path": best, "why": None, "kernel": "native"}
    assert not empty.exists() or not any(empty.iterdir())  # nothing was compiled
