"""What a wheel install gets: every file the package needs beyond its Python modules (the
native kernels' sources and headers, models.yaml, the data files), and the native kernels
compiled (build_backend/elmd_build.py), which run from the installed copy with no compiler.
The wheel is built from a copy of the checkout and installed into a fresh virtual environment
that borrows this one's dependencies (torch included)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from elmd.engine.kernels import native

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build_backend"))
import elmd_build  # noqa: E402

pytestmark = pytest.mark.slow

# Run inside the wheel's environment: which elmd it imports, which CPU kernels it runs and,
# where they run, an int8 matmul through them against ATen's; where this CPU cannot run
# them, every kernel source still preprocesses from the installed files (headers found; on x86).
IN_THE_WHEEL = r"""
import json, pathlib, platform, subprocess, sys, sysconfig, torch
from torch.utils.cpp_extension import include_paths
import elmd
from elmd.engine.kernels import native
from elmd.engine.quantize import QuantizedLinear, parse_quant

path, why = native.kernel_path()
report = {"elmd": elmd.__file__, "path": path, "why": why}
if path != "aten":
    layer = QuantizedLinear.from_float(torch.nn.Linear(64, 32, bias=False), parse_quant("int8"))
    x = torch.randn(2, 64)
    layer.prepare("native"); ours = layer(x)
    layer.prepare("aten"); aten = layer(x)
    report["relative_error"] = float((ours - aten).norm() / aten.norm())
elif platform.machine() in ("x86_64", "AMD64"):  # the kernels' intrinsics headers are x86's
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    report["preprocessed"] = {
        source.name: subprocess.run(["c++", "-std=c++17", "-E", "-o", "/dev/null", *includes, str(source)],
                                    capture_output=True, text=True).stderr[-2000:] or "ok"
        for source in sorted(pathlib.Path(native.__file__).parent.glob("*.cpp"))}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy, so setuptools' build/ folder never lands in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name, follow_symlinks=False)
    for name in ("elmd", "build_backend"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "prebuilt"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(source)], check=True, timeout=1500)  # it compiles the kernels: minutes
    (built,) = (tmp / "dist").glob("elmd-*.whl")
    return built


def test_the_wheel_ships_every_file_the_package_has(wheel):
    """The kernel headers and sources, models.yaml, the data files: whatever lives in elmd/
    beside the modules, so a file added later cannot be left out silently."""
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = {path.relative_to(REPO).as_posix() for path in (REPO / "elmd").rglob("*")
              if path.is_file() and "__pycache__" not in path.parts}
    assert "elmd/engine/kernels/kernels.h" in needed and "elmd/models.yaml" in needed
    assert needed - shipped == set()
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("elmd/models.yaml") == (REPO / "elmd" / "models.yaml").read_bytes()


def test_the_backend_compiles_against_the_torch_that_pyproject_pins():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"{elmd_build.TORCH}; sys_platform != 'darwin'" in dependencies


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"),
                    reason="the wheel carries compiled kernels for x86-64 Linux")
def test_the_wheel_carries_every_build_compiled(wheel):
    """Every x86-64 build, in a wheel tagged for this Python and platform (the kernels link
    torch's Python bindings), so pip never installs it where they cannot load."""
    python = "cp%d%d" % sys.version_info[:2]
    assert wheel.name.endswith(f"-{python}-{python}-linux_x86_64.whl"), wheel.name
    carried = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/kernels/prebuilt/" in n}
    variants = [(build, frozenset()) for build in native.BUILDS] + [(native.BUILDS[-1], frozenset({"avx_vnni"}))]
    assert carried == {f"{native.build_name(build, flags)}.so" for build, flags in variants}


@pytest.mark.timeout(1200)
def test_a_wheel_install_runs_the_native_kernels_it_carries_without_a_compiler(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ELMD_CPU_KERNELS")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300, env=env)  # fmt: skip (no PYTHONPATH: a checkout there would count as installed)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # torch and the rest come from this environment, after the wheel's own site-packages
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "borrowed-dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    extensions = tmp_path / "torch_extensions"
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), CXX="/nonexistent/c++")  # nothing cached, no compiler
    result = subprocess.run([str(python), "-c", IN_THE_WHEEL], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert Path(report["elmd"]).is_relative_to(site)
    if report["path"] == "aten":
        assert "lacks" in report["why"], report  # only this CPU may keep the native kernels off
        if platform.machine() in ("x86_64", "AMD64"):
            assert report["preprocessed"] and set(report["preprocessed"].values()) == {"ok"}, report
    else:
        best = next(build.path for build in native.BUILDS if build.cpu_flags <= native.cpu_flags())
        assert (report["path"], report["why"]) == (best, None), report
        assert report["relative_error"] < 0.015, report  # tests/test_quantize.py's bound
        assert not extensions.exists() or not any(extensions.iterdir())  # nothing was compiled
