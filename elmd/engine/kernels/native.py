"""The package's native CPU kernels: built on first use, or None where they cannot run.

qgemv.cpp holds the weight-streaming matmuls (int8, int4, bf16), amx.cpp the int8/int4
matmuls and the attention of prompts on AMX (used where the CPU has it), decode.cpp the fused
small operations between them (QK-norm + RoPE + KV write + attention, residual add +
RMSNorm, SwiGLU) and the native plan that runs a decode step or a prompt chunk in one call.

Builds of the same sources, chosen at run time by the CPU's flags: on x86-64 "avx512"
(AVX512-VNNI + AVX512-BF16, with amx.cpp for CPUs with AMX), "avx512-vnni" (the same
without BF16) and "avx2" (AVX2 + FMA + F16C, with AVX-VNNI where the CPU has it); on ARM64
"neon" (ARMv8.2-A NEON with the dot product and float16 extensions); simd.h gives each its
16-lane vectors, so the packed weights are the same for all.
ELMD_CPU_KERNELS=auto|avx512|avx512-vnni|avx2|neon|aten forces one
(auto: the best this CPU runs). Where no build can run (another CPU, no C++ compiler or
ninja, a failed build) elmd/engine/quantize.py falls back to ATen's own kernels, so the
native build is only ever a speed-up; kernel_path() says which path runs and, when it is
not the best for this CPU, why. Builds are cached by torch (TORCH_EXTENSIONS_DIR), so
only the first start on a machine pays for the compile; the daemon serves on ATen
meanwhile (build_in_background) and switches once they are loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from pathlib import Path

import torch

KERNELS_ENV = "ELMD_CPU_KERNELS"
BUILD_NICENESS = 10  # the background build's priority, below the requests it runs beside
CHOICES = ("auto", "avx512", "avx512-vnni", "avx2", "neon", "aten")


@dataclasses.dataclass(frozen=True)
class Build:
    """One native build: the CPU flags it needs, its sources and its compiler flags."""

    path: str
    cpu_flags: frozenset[str]
    sources: tuple[str, ...]
    compiler_flags: tuple[str, ...]


# -fopenmp: at::parallel_for is an inline OpenMP loop; without it the kernels run on one
# thread. At run time the library binds to the libgomp torch has already loaded (same soname).
_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma")
X86_BUILDS = (  # best first
    Build("avx512", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c", "fma"}),
          ("qgemv.cpp", "decode.cpp", "amx.cpp"), (*_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16")),
    # AVX-512 without BF16 (Intel Ice Lake / Cascade Lake, the common cloud CPUs): the same
    # int8/int4 kernels; only bf16 weights are widened instead of taken by VDPBF16PS.
    Build("avx512-vnni", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"}),
          ("qgemv.cpp", "decode.cpp"), _AVX512),
    Build("avx2", frozenset({"avx2", "fma", "f16c"}), ("qgemv.cpp", "decode.cpp"), ("-mavx2", "-mfma", "-mf16c")),
)
# ARM64 (Graviton 2 and later, Ampere Altra, Raspberry Pi 5, Windows on ARM, Linux on Apple
# silicon): SDOT for the int8/int4 dot products, float16 conversions for the KV cache and scales.
ARM64_BUILDS = (
    Build("neon", frozenset({"asimd", "asimddp", "fphp", "asimdhp"}), ("qgemv.cpp", "decode.cpp"),
          ("-march=armv8.2-a+dotprod+fp16",)),
)
ARM64 = ("aarch64", "arm64")
BUILDS = ARM64_BUILDS if platform.machine().lower() in ARM64 else X86_BUILDS
# The Linux HWCAP bits (asm/hwcap.h) of the features the ARM64 build needs.
ARM64_HWCAPS = {"asimd": 1 << 1, "fphp": 1 << 9, "asimdhp": 1 << 10, "asimddp": 1 << 20}
HEADERS = ("kernels.h", "simd.h")  # included by every build's sources
PREBUILT = Path(__file__).with_name("prebuilt")  # the compiled builds a wheel carries (prebuild)
ROWS = 16  # output rows per register in qgemv.cpp
log = logging.getLogger(__name__)
_selecting = threading.Lock()  # a background build at start-up and a first request may both ask
_background: Future | None = None  # the background build, once started
_build_lock = threading.Lock()
_said_building = False


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them: /proc/cpuinfo's on x86-64; on ARM64 the
    kernel's HWCAP bits (what the kernel says user space may run, also under emulation)."""
    if platform.machine().lower() in ARM64:
        return _arm64_features()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _arm64_features() -> frozenset[str]:
    if not sys.platform.startswith("linux"):  # macOS serves through MLX; its PyTorch runs on ATen here
        return frozenset()
    import ctypes

    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    hwcap = getauxval(16)  # AT_HWCAP
    return frozenset(name for name, bit in ARM64_HWCAPS.items() if hwcap & bit)


def load():
    """The kernels as torch ops (torch.ops.elmd), or None where ATen's run instead (see
    kernel_path). Registered with shape functions, so torch.compile can trace through them."""
    with _selecting:
        return _select()[0]


def kernel_path() -> tuple[str, str | None]:
    """The CPU kernel path in use (a build's path, such as "avx512", or "aten"; building it on first call)
    and, when it is not the best this CPU could run, why."""
    with _selecting:
        return _select()[1:]


@functools.cache
def _select():
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        log.warning("%s=%s is not one of %s; using auto", KERNELS_ENV, choice, "|".join(CHOICES))
        choice = "auto"
    flags = cpu_flags() if platform.machine().lower() in ("x86_64", "amd64", *ARM64) else frozenset()
    runnable = [b for b in BUILDS if b.cpu_flags <= flags]
    if not runnable:
        missing = ", ".join(sorted(BUILDS[-1].cpu_flags - flags))
        return None, "aten", f"no native kernels for this CPU ({platform.machine()}, lacks {missing})"
    best = runnable[0]
    if choice == "aten":
        return None, "aten", f"forced by {KERNELS_ENV}=aten"
    if choice != "auto":
        forced = next((b for b in BUILDS if b.path == choice), None)
        if forced is None:
            return None, "aten", f"{KERNELS_ENV}={choice} is not built for {platform.machine()}"
        if forced not in runnable:
            missing = ", ".join(sorted(forced.cpu_flags - flags))
            return None, "aten", f"{KERNELS_ENV}={choice}, but this CPU lacks {missing}"
        runnable = [forced]
    forced_why = f"forced by {KERNELS_ENV}={choice}" if choice != "auto" and runnable[0] != best else None
    if _load_prebuilt(runnable[0], flags):
        _register_shapes()
        return torch.ops.elmd, runnable[0].path, forced_why
    compiler = os.environ.get("CXX", "c++")  # the one torch's build runs
    if shutil.which(compiler) is None:
        return None, "aten", f"no C++ compiler ({compiler})"
    failures = []
    for build in runnable:
        failure = _build(build, flags)
        if failure is None:
            _register_shapes()
            why = "; ".join(failures) or (f"forced by {KERNELS_ENV}={choice}" if build != best else None)
            return torch.ops.elmd, build.path, why
        failures.append(f"{build.path} build failed: {failure}")
        log.warning("native %s kernels unavailable: %s", build.path, failure)
    return None, "aten", "; ".join(failures)


def _load_prebuilt(build: Build, flags: frozenset[str]) -> bool:
    """Load `build` as a wheel carries it, compiled (prebuild), if it carries this build of
    these sources for this torch and Python: a wheel install runs the native kernels from its
    first token, with no compiler."""
    library = PREBUILT / f"{build_name(build, flags)}.so"
    if not library.is_file():
        return False
    try:
        torch.ops.load_library(str(library))
    except OSError as e:
        log.warning("the prebuilt %s kernels did not load (%s); building them instead", build.path, e)
        return False
    return True


def prebuild(target: Path | None = None) -> list[Path]:
    """Compile every build for this machine's architecture (and avx2's AVX-VNNI variant) into
    `target` (PREBUILT), as the wheel carries them: build_backend/elmd_build.py runs this when
    `pip wheel` builds one. Each compiles in a child process (one native build per process), in
    a folder of its own."""
    import tempfile

    target = target or PREBUILT
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    libraries = []
    variants = [(build, frozenset()) for build in BUILDS]
    if BUILDS is X86_BUILDS:
        variants.append((BUILDS[-1], frozenset({"avx_vnni"})))
    before = os.environ.get("TORCH_EXTENSIONS_DIR")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["TORCH_EXTENSIONS_DIR"] = folder  # the children's build folders
        try:
            for build, flags in variants:
                spec = build_spec(build, flags)
                if failure := _compile_apart(spec):
                    raise RuntimeError(f"the {spec['name']} kernels did not compile: {failure}")
                libraries.append(Path(shutil.copy(Path(folder) / spec["name"] / f"{spec['name']}.so", target)))
        finally:
            os.environ.pop("TORCH_EXTENSIONS_DIR")
            if before is not None:
                os.environ["TORCH_EXTENSIONS_DIR"] = before
    return libraries


def build_name(build: Build, flags: frozenset[str]) -> str:
    """The extension's name (and folder under TORCH_EXTENSIONS_DIR) for `build` on a CPU with
    `flags`, ending in a hash of its sources, compiler flags, torch's and Python's versions: two installs
    of elmd on one machine (a wheel's and a checkout's) each keep their own build instead of
    rebuilding over each other's at every start, and installs of the same sources share one."""
    name = f"elmd_kernels_{build.path.replace('-', '_')}" + ("_vnni" if build.path == "avx2" and "avx_vnni" in flags else "")
    python = "%d.%d" % sys.version_info[:2]
    digest = hashlib.sha256(f"{name} {' '.join(build.compiler_flags)} torch {torch.__version__} python {python}".encode())
    for source in (*build.sources, *HEADERS):
        digest.update(Path(__file__).with_name(source).read_bytes())
    return f"{name}_{digest.hexdigest()[:12]}"


def build_spec(build: Build, flags: frozenset[str]) -> dict:
    """torch.utils.cpp_extension.load's arguments for `build` on a CPU with `flags`."""
    extra = ("-mavxvnni",) if build.path == "avx2" and "avx_vnni" in flags else ()
    return {"name": build_name(build, flags),
            "sources": [str(Path(__file__).with_name(source)) for source in build.sources],
            "extra_cflags": ["-O3", "-fopenmp", *build.compiler_flags, *extra], "extra_ldflags": ["-fopenmp"]}


def _build(build: Build, flags: frozenset[str]) -> str | None:
    """Compiles one build in a child process, then loads it here; returns None, or why it
    failed (its first line). The compile runs apart so that a process exiting while it runs
    (a script done before the first build is) neither aborts in the compiler's wait (C++
    frames on a daemon thread at interpreter exit) nor leaves compilers behind it."""
    global _extensions_root
    spec = build_spec(build, flags)
    try:
        from torch.utils.cpp_extension import _get_build_directory

        build_dir = Path(_get_build_directory(spec["name"], verbose=False))
        _extensions_root = build_dir.parent
        started = time.monotonic()
        with _sole_builder(build_dir):
            if failure := _compile_apart(spec):
                return failure
            _compile_and_load(spec)  # now only checks that the build is current, and loads it
    except StoppedAtExit:
        raise
    except Exception as e:  # no ninja, or a compiler that lacks these intrinsics
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if (seconds := time.monotonic() - started) > COMPILED_SECONDS:
        with contextlib.suppress(OSError):  # kept so that the next build here can say how long it takes
            (build_dir.parent / BUILD_SECONDS_FILE).write_text(f"{seconds:.0f}\n")
    return None


def _compile_and_load(spec: dict) -> None:
    from torch.utils.cpp_extension import load as compile_and_load

    compile_and_load(**spec, is_python_module=False, verbose=False)


def _compile_apart(spec: dict) -> str | None:
    """Run the compile in a child process that leads its own process group (this thread's
    nice value is inherited); None once it built, else its failure's first line. The child
    ends with its compilers when this process does (see _compile_as_child)."""
    command = [sys.executable, "-m", __name__, json.dumps(spec), str(os.getpid())]
    package_root = str(Path(__file__).resolve().parents[3])  # this elmd, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                             start_new_session=True)
    with _children_lock:
        _children.add(child)
    try:
        out, _ = child.communicate()
    finally:
        with _children_lock:
            _children.discard(child)
    if _exiting:
        raise StoppedAtExit
    if child.returncode == 0:
        return None
    return out.strip().splitlines()[-1] if out.strip() else f"the compiler's process ended with {child.returncode}"


_children: set[subprocess.Popen] = set()  # compiles running now, stopped at exit
_children_lock = threading.Lock()
_exiting = False


class StoppedAtExit(Exception):
    """The process is exiting: the build ends unfinished, and nothing waits for it."""


@atexit.register
def _stop_compiles() -> None:
    global _exiting
    _exiting = True
    with _children_lock:
        for child in _children:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGTERM)  # ninja, on SIGTERM, stops the compilers it started


def _compile_as_child(spec: dict, parent: int) -> int:
    """The child's side: compile, print why if it fails. On Linux it asks for SIGTERM when its
    parent ends (a daemon killed outright) and passes it to its group: ninja then stops the
    compilers it started (each in a process group of its own, out of reach of ours)."""
    if sys.platform.startswith("linux"):
        import ctypes

        def end_group(*_):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.killpg(0, signal.SIGTERM)
            os._exit(1)

        signal.signal(signal.SIGTERM, end_group)
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent was gone before the request took effect
            return 1
    try:
        _compile_and_load(spec)
    except Exception as e:
        print(str(e).splitlines()[0] if str(e) else type(e).__name__, flush=True)
        return 1
    return 0


@contextlib.contextmanager
def _sole_builder(build_dir: Path):
    """Hold an flock on the build folder while torch builds in it. torch's own lock is a file,
    which a build killed midway (a daemon stopped during its first start) leaves behind, and
    every later build then waits for it forever. An flock ends with its process, so whoever
    holds it knows that a torch lock still there is stale, and removes it."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's lock alone
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "elmd-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits for a live build in another elmd process
        (build_dir / "lock").unlink(missing_ok=True)
        yield


def _register_shapes() -> None:
    def rows_out(x, n):
        return x.new_empty((*x.shape[:-1], n))

    torch.library.register_fake("elmd::int8_linear")(lambda x, w, scale: rows_out(x, scale.shape[0]))
    torch.library.register_fake("elmd::int4_linear")(lambda x, w, scale, zero, group: rows_out(x, scale.shape[0] * ROWS))
    torch.library.register_fake("elmd::float_linear")(lambda x, w: rows_out(x, w.shape[0]))


def build_in_background() -> Future:
    """Run load() on a thread of its own (once per process): a first build takes minutes
    (build_estimate), which a starting daemon spends serving on ATen. The future holds load()'s result."""
    global _background
    with _build_lock:
        if _background is None:
            _background = Future()
            threading.Thread(target=_run_build, args=(_background,), name="elmd-kernel-build", daemon=True).start()
        return _background


def _run_build(future: Future) -> None:
    started = time.monotonic()
    _yield_cpus_to_serving()
    try:
        ops = load()
    except StoppedAtExit:
        return
    except BaseException as e:  # load() reports its own failures; anything else still ends the wait
        future.set_exception(e)
        return
    if _exiting:  # a build done as the process exits: switching to it would run beside finalization
        return
    if ops is not None:
        log.info("CPU kernels ready (%s) after %.0f s", kernel_path()[0], time.monotonic() - started)
    future.set_result(ops)


COMPILED_SECONDS = 10  # a cached build loads in about a second; longer means it compiled
BUILD_SECONDS_FILE = "elmd-build-seconds"  # beside the builds' folders: what the last compile here took
# What a first build took where it was measured: the first start of a fresh install, the build
# niced beside the requests served meanwhile (benchmarks/first_start.py): 50 s on a 2-core AMD
# EPYC (Zen 4), 113-152 s on a 2-core Intel Xeon (issue 31).
MEASURED_FIRST_BUILD = "50-152 s on 2-core machines"
_extensions_root: Path | None = None  # where builds go (TORCH_EXTENSIONS_DIR), once one has started


def build_estimate() -> str:
    """How long a build takes, from measurement: the last compile on this machine, else the
    figures measured on a 2-core machine (a guess would be wrong by minutes either way)."""
    try:
        return f"the last build on this machine took {int((_extensions_root / BUILD_SECONDS_FILE).read_text())} s"
    except (TypeError, OSError, ValueError):
        return f"measured at {MEASURED_FIRST_BUILD}"


def _yield_cpus_to_serving() -> None:
    """Lower this thread's priority, and so that of the compilers it starts (Linux keeps a
    nice value per thread, and a child inherits its parent thread's): requests answered on
    ATen meanwhile keep the CPUs they need, and the build takes what is left."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: the build runs at normal priority
        pass


def ops_after(seconds: float):
    """Start the background build and wait up to `seconds` for it (a cached build loads in
    about a second; once a wait has timed out, later ones do not wait): the kernels, or None
    while a first build runs on (said once in the log)."""
    global _said_building
    build = build_in_background()
    try:
        return build.result(timeout=0 if _said_building else seconds)
    except FutureTimeout:
        with _build_lock:
            if not _said_building:
                _said_building = True
                log.warning("building CPU kernels for this machine (once; %s); serving meanwhile on ATen",
                            build_estimate())
        return None


def ops():
    """The kernels if they can run now: load(), except while a background build is still
    running (then None: callers take ATen's path, never wait for the compiler)."""
    if _background is not None and not _background.done():
        return None
    return load()


def supports(out_features: int, in_features: int, group_size: int = 32) -> bool:
    """Shapes the native kernels take: whole 16-row blocks and whole 32-wide activation blocks."""
    return out_features % ROWS == 0 and in_features % group_size == 0 and group_size % 32 == 0


def supports_float(out_features: int, in_features: int) -> bool:
    """Shapes float_linear takes (float32 or bf16 weights): whole 4-row tiles, whole 32-wide steps."""
    return out_features % 4 == 0 and in_features % 32 == 0


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> uint8 [N*K]: blocks of 16 rows x 4 k, each value + 128 (VPDPBUSD's unsigned side)."""
    n, k = q.shape
    u = q.contiguous().view(torch.uint8) ^ 0x80
    return u.view(n // ROWS, ROWS, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1)


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    u = packed.view(n // ROWS, k // 4, ROWS, 4).permute(0, 2, 1, 3).reshape(n, k)
    return (u ^ 0x80).view(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> uint8 [N*K/2]: per 16 rows x 8 k, the low nibbles
    hold k 0-3 and the high nibbles k 4-7 of each row's 32-bit lane."""
    n, k = q.shape
    t = q.view(n // ROWS, ROWS, k // 8, 2, 4).permute(0, 2, 1, 3, 4)
    return (t[..., 0, :] | (t[..., 1, :] << 4)).contiguous().view(-1)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    t = packed.view(n // ROWS, k // 8, ROWS, 1, 4)
    both = torch.cat([t & 0x0F, t >> 4], dim=3)  # [N/16, K/8, 16, 2, 4]
    return both.permute(0, 2, 1, 3, 4).reshape(n, k)


def pack_groups(values: torch.Tensor) -> torch.Tensor:
    """[N, K/G] per-group values -> [N/16, K/G, 16]: one register of 16 rows per group."""
    n, groups = values.shape
    return values.view(n // ROWS, ROWS, groups).permute(0, 2, 1).contiguous()


def unpack_groups(values: torch.Tensor) -> torch.Tensor:
    blocks, groups, rows = values.shape
    return values.permute(0, 2, 1).reshape(blocks * rows, groups)


def int8_rows(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the int8 matrix, read straight from the packed layout (embedding lookups)."""
    u = packed.view(n // ROWS, k // 4, ROWS, 4)[rows // ROWS, :, rows % ROWS]  # [len, K/4, 4]
    return (u.reshape(-1, k) ^ 0x80).view(torch.int8)


def int4_rows(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor) -> torch.Tensor:
    t = packed.view(n // ROWS, k // 8, ROWS, 4)[rows // ROWS, :, rows % ROWS]  # [len, K/8, 4]
    return torch.stack([t & 0x0F, t >> 4], dim=-2).reshape(-1, k)


def group_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return values[rows // ROWS, :, rows % ROWS]


if __name__ == "__main__":  # the compile's child process (_compile_apart)
    sys.exit(_compile_as_child(json.loads(sys.argv[1]), int(sys.argv[2])))
