"""The package's native CPU kernels: built on first use, or None where they cannot run.

qgemv.cpp holds the weight-streaming matmuls (int8, int4, bf16), amx.cpp the int8/int4
matmuls and the attention of prompts on AMX (used where the CPU has it), decode.cpp the fused
small operations between them (QK-norm + RoPE + KV write + attention, residual add +
RMSNorm, SwiGLU) and the native plan that runs a decode step or a prompt chunk in one call.

They need x86-64 with AVX512-VNNI and AVX512-BF16, a C++ compiler and ninja. Where any
is missing, elmd/engine/quantize.py falls back to ATen's own kernels, so the native
build is only ever a speed-up. The build is cached by torch (TORCH_EXTENSIONS_DIR),
so only the first start on a machine pays for the compile.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("qgemv.cpp", "decode.cpp", "amx.cpp")]
NEEDED_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c", "fma"})
# -fopenmp: at::parallel_for is an inline OpenMP loop; without it the kernels run on one
# thread. At run time the library binds to the libgomp torch has already loaded (same soname).
COMPILER_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16",
                  "-mf16c", "-mfma", "-mamx-tile", "-mamx-bf16"]
ROWS = 16  # output rows per register in qgemv.cpp
log = logging.getLogger(__name__)


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def load():
    """The kernels as torch ops (torch.ops.elmd), or None (wrong CPU, no compiler or ninja,
    build failure). Registered with shape functions, so torch.compile can trace through them."""
    if platform.machine() not in ("x86_64", "AMD64") or not NEEDED_CPU_FLAGS <= cpu_flags():
        return None
    try:
        from torch.utils.cpp_extension import load as build

        build(name="elmd_kernels", sources=[str(path) for path in SOURCES], extra_cflags=COMPILER_FLAGS,
              extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, or a compiler that lacks these intrinsics
        log.warning("native kernels unavailable, using ATen's: %s", str(e).splitlines()[0] if str(e) else e)
        return None
    _register_shapes()
    return torch.ops.elmd


def _register_shapes() -> None:
    def rows_out(x, n):
        return x.new_empty((*x.shape[:-1], n))

    torch.library.register_fake("elmd::int8_linear")(lambda x, w, scale: rows_out(x, scale.shape[0]))
    torch.library.register_fake("elmd::int4_linear")(lambda x, w, scale, zero, group: rows_out(x, scale.shape[0] * ROWS))
    torch.library.register_fake("elmd::bf16_linear")(lambda x, w: rows_out(x, w.shape[0]))


def supports(out_features: int, in_features: int, group_size: int = 32) -> bool:
    """Shapes the native kernels take: whole 16-row blocks and whole 32-wide activation blocks."""
    return out_features % ROWS == 0 and in_features % group_size == 0 and group_size % 32 == 0


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
