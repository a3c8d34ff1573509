"""Which CPU kernel path runs (ELMD_CPU_KERNELS, the CPU's flags, the compiler), and each
native build's numerics against ATen.

The kernel tests of test_quantize.py and test_engine.py run in this process on the best
path for this CPU; a native build is one library per process (one `elmd` op namespace),
so every other path is checked in a child process started with ELMD_CPU_KERNELS.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from elmd.engine.kernels import native

ROOT = Path(__file__).resolve().parent.parent
AVX2_FLAGS = ["avx2", "fma", "f16c"]


def paths_in_child(cases: list[tuple[dict[str, str], list[str] | None]]) -> list[dict]:
    """kernel_path() and what really runs, per case, in one child: the native libraries
    mapped and the kernel a quantized linear layer picks. A case is the environment's
    overrides and the CPU flags that stand in for the CPU's (None: its own). Only the last
    case may load a native build (one per process); the others are chosen afresh."""
    code = f"""
import json, os
from elmd.engine import quantize
from elmd.engine.kernels import native
from torch import nn
layer = quantize.QuantizedLinear.from_float(nn.Linear(64, 32, bias=False), quantize.parse_quant("int8"))
own_flags = native.cpu_flags
for env, flags in {cases!r}:
    os.environ.update(env)
    native.cpu_flags = own_flags if flags is None else (lambda flags=flags: frozenset(flags))
    native._select.cache_clear()
    path, why = native.kernel_path()
    libraries = sorted({{line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps") if "elmd_kernels" in line}})
    print(json.dumps({{"path": path, "why": why, "kernel": layer.prepare(), "libraries": libraries}}))
    for name in env:
        del os.environ[name]
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k not in ("ELMD_CPU_KERNELS", "CXX")})
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()[-len(cases):]]


def path_in_child(env: dict[str, str], flags: list[str] | None = None) -> dict:
    return paths_in_child([(env, flags)])[0]


def runnable() -> list[str]:
    flags = native.cpu_flags()
    return [build.path for build in native.BUILDS if build.cpu_flags <= flags]


needs_avx2 = pytest.mark.skipif("avx2" not in runnable(), reason="needs an x86 CPU with AVX2, FMA and F16C")


@needs_avx2
def test_avx2_forced_runs_the_avx2_build():
    got = path_in_child({"ELMD_CPU_KERNELS": "avx2"})
    best = runnable()[0]
    assert got["path"] == "avx2" and got["kernel"] == "native"
    assert got["why"] == (None if best == "avx2" else "forced by ELMD_CPU_KERNELS=avx2")
    assert [re.sub("_[0-9a-f]{12}[.]so$", ".so", name) for name in got["libraries"] if name.endswith(".so")] in (
        ["elmd_kernels_avx2.so"], ["elmd_kernels_avx2_vnni.so"])


@needs_avx2
def test_auto_takes_the_best_build_for_the_cpu_without_a_reason():
    got = path_in_child({"ELMD_CPU_KERNELS": "auto"})
    assert got["path"] == runnable()[0] and got["why"] is None and got["kernel"] == "native"


@needs_avx2
def test_a_cpu_with_only_avx2_runs_the_avx2_build():
    assert path_in_child({"ELMD_CPU_KERNELS": "auto"}, AVX2_FLAGS)["path"] == "avx2"


def test_a_build_folder_is_keyed_by_its_sources_so_installs_do_not_rebuild_over_each_other(tmp_path, monkeypatch):
    """Another install's copy of the same sources names the same build; changed sources
    (another version of elmd) name another, so neither rebuilds over the other at each start."""
    kernels = Path(native.__file__).parent
    build = native.BUILDS[-1]
    here = native.build_name(build, frozenset())
    for source in (*build.sources, *native.HEADERS):
        (tmp_path / source).write_bytes((kernels / source).read_bytes())
    monkeypatch.setattr(native, "__file__", str(tmp_path / "native.py"))
    assert native.build_name(build, frozenset()) == here
    (tmp_path / "simd.h").write_text((kernels / "simd.h").read_text() + "\n// another version\n")
    other = native.build_name(build, frozenset())
    assert other != here and other.startswith("elmd_kernels_avx2_") and other.isidentifier()


@pytest.mark.skipif("avx512-vnni" not in runnable(), reason="needs a CPU with AVX512-VNNI")
def test_a_cpu_with_avx512_but_no_bf16_runs_the_avx512_vnni_build():
    """Ice Lake / Cascade Lake class: AVX-512 with VNNI, without AVX512-BF16. The int8/int4
    kernels keep AVX-512; the best build for that CPU, so no reason is given."""
    flags = sorted(native.cpu_flags() - {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
    got = path_in_child({"ELMD_CPU_KERNELS": "auto"}, flags)
    assert got["path"] == "avx512-vnni" and got["why"] is None and got["kernel"] == "native"
    assert [re.sub("_[0-9a-f]{12}[.]so$", ".so", name) for name in got["libraries"] if name.endswith(".so")] == [
        "elmd_kernels_avx512_vnni.so"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the native builds are x86's")
def test_aten_where_forced_or_no_native_build_can_run_and_why():
    """ELMD_CPU_KERNELS=aten, forced onto a build the CPU lacks, a CPU without AVX2, no
    compiler: ATen's kernels, no native library loaded, and the reason."""
    aten, forced, old_cpu, no_compiler = paths_in_child([
        ({"ELMD_CPU_KERNELS": "aten"}, None),
        ({"ELMD_CPU_KERNELS": "avx512"}, AVX2_FLAGS),
        ({}, ["sse4_2", "avx"]),
        ({"CXX": "/nonexistent/c++"}, AVX2_FLAGS),
    ])
    assert forced["why"] == "ELMD_CPU_KERNELS=avx512, but this CPU lacks avx512_bf16, avx512_vnni, avx512bw, avx512f, avx512vl"
    assert old_cpu["why"].startswith("no native kernels for this CPU") and old_cpu["why"].endswith("lacks avx2, f16c, fma)")
    assert no_compiler["why"] == "no C++ compiler (/nonexistent/c++)"
    assert aten["why"] == "forced by ELMD_CPU_KERNELS=aten"
    for got in (aten, forced, old_cpu, no_compiler):
        assert got["path"] == "aten" and got["kernel"] == "aten" and got["libraries"] == []


def test_an_arm64_cpu_runs_the_neon_build_where_it_has_the_dot_product(monkeypatch):
    """On ARM64 the choice is among ARM64's builds, by the HWCAP features: without SDOT (a
    Cortex-A72, Raspberry Pi 4) ATen's kernels and the reason; an x86 path forced there is
    refused by name. (The neon build itself is tested under emulation: tests/arm64/run.)"""
    monkeypatch.setattr(native, "BUILDS", native.ARM64_BUILDS)
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"asimd", "fphp", "asimdhp"}))
    choose = native._select.__wrapped__  # uncached: this process keeps its own choice
    assert choose()[1:] == ("aten", "no native kernels for this CPU (aarch64, lacks asimddp)")
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"asimd", "fphp", "asimdhp", "asimddp"}))
    monkeypatch.setenv("ELMD_CPU_KERNELS", "avx2")
    assert choose()[1:] == ("aten", "ELMD_CPU_KERNELS=avx2 is not built for aarch64")
    monkeypatch.setenv("ELMD_CPU_KERNELS", "neon")
    monkeypatch.setattr(native, "_load_prebuilt", lambda build, flags: build.path == "neon")  # as a wheel built there carries it
    monkeypatch.setattr(native, "_register_shapes", lambda: None)
    assert choose()[1:] == ("neon", None)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs Debian's g++-aarch64-linux-gnu")
def test_the_neon_build_compiles_for_arm64_with_sdot(tmp_path):
    """The ARM64 build's sources, with its flags, through Debian's aarch64 cross compiler (against
    this torch's headers, the same on ARM64): a change to the kernel code shared by every build
    cannot break ARM64 unseen, and the int8/int4 dot products are SDOT. Its numerics run
    under emulation, with PyPI's aarch64 torch (tests/arm64/run)."""
    from torch.utils.cpp_extension import include_paths

    build = native.ARM64_BUILDS[0]
    includes = [flag for path in [*include_paths(), sysconfig.get_paths()["include"]] for flag in ("-isystem", path)]
    for source in build.sources:
        obj = tmp_path / f"{source}.o"
        done = subprocess.run(["aarch64-linux-gnu-g++", "-std=c++20", "-O3", "-fPIC", "-fopenmp", *build.compiler_flags,
                               "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, "-c", str(native.PREBUILT.parent / source),
                               "-o", str(obj)], capture_output=True, text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
    code = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(tmp_path / "qgemv.cpp.o")], capture_output=True,
                          text=True, check=True).stdout
    assert re.search(r"\tsdot\t", code), "no SDOT in the int8/int4 kernels"


@pytest.mark.parametrize("path", runnable()[1:])
def test_kernels_of_a_build_this_process_does_not_run_match_aten(path):
    """The kernel tests, with their tolerances, in a child forced onto `path` (on this CPU
    the best build runs them in this process)."""
    tests = ["tests/test_quantize.py", "tests/test_engine.py::test_native_plan_decode_matches_aten_for_sequences_at_different_lengths",
             "tests/test_engine.py::test_native_plan_prefill_matches_aten_over_prompt_chunks",
             "tests/test_engine.py::test_native_decode_attention_matches_a_reference_over_long_spans"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "ELMD_CPU_KERNELS": path}, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:]
