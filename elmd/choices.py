"""The names a user picks from (flags, config.yaml, models.yaml), each vocabulary written
once: argparse and pydantic check them at the edge. For serving, the catalog's spec of a
model turns `auto` into a runtime and a quant spelling into a concrete elmd.quant.Quant,
which the load plan carries down to the backend. Also the one rule for which runtime `auto`
means."""

from __future__ import annotations

import importlib.util
import platform
import sys
from typing import Literal, get_args

Backend = Literal["auto", "torch", "mlx"]
Runtime = Literal["torch", "mlx"]  # a backend once `auto` is decided
Dtype = Literal["auto", "float32", "bfloat16"]  # activations; auto: the model's models.yaml dtype, else float32
# Weights: bf16; int8 (PyTorch: per output channel; MLX: group 64); int4 per group of 32, 64 or 128.
# The spellings only: elmd.quant.Quant.parse turns one into a concrete quantization for a backend.
QuantName = Literal["none", "bf16", "int8", "int4", "int4-g32", "int4-g64", "int4-g128"]

BACKENDS: tuple[str, ...] = get_args(Backend)
RUNTIMES: tuple[str, ...] = get_args(Runtime)
DTYPES: tuple[str, ...] = get_args(Dtype)
QUANTS: tuple[str, ...] = get_args(QuantName)


def pick_backend(backend: str = "auto") -> str:
    """`auto` is MLX on Apple silicon where MLX is installed, PyTorch everywhere else; the
    others are taken as asked. Pull, import, serve and load all decide by this."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    return "mlx" if apple_silicon and importlib.util.find_spec("mlx") else "torch"
