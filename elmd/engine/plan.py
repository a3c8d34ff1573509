"""What one model load runs, decided once before a backend is built: the backend, device,
activation dtype, concrete quantization (elmd.quant.Quant) and that backend's own options.

`plan_load` holds every per-backend rule that used to rewrite the request on its way down
(bare int4's group, bf16 on MLX, bf16 activations on the CPU); a backend receives only its
part of the plan and reports what it runs in BackendInfo."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from elmd.choices import pick_backend
from elmd.quant import Quant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchOptions:
    """The PyTorch backend's options (see TorchBackend)."""

    device: str = "auto"
    slots: int = 8  # sequences decoding at once; the server passes max_concurrent_requests
    prefix_cache_bytes: int = 256 << 20
    cuda_graphs: bool = True
    compile_decode: bool = False
    kv_cache_dtype: str = "auto"
    speculation: bool = True
    draft_dir: Path | None = None
    draft_quant: Quant = Quant()


@dataclass(frozen=True)
class MLXOptions:
    """The MLX backend's options (see MLXBackend)."""

    max_batch: int = 32  # mlx-lm's batch; the server sets it to max_concurrent_requests, as PyTorch's slots
    prefix_cache_bytes: int = 256 << 20


@dataclass(frozen=True)
class LoadPlan:
    backend: str  # "torch" | "mlx"
    dtype: str  # activations: auto (the backend's default for its device), float32, bfloat16, float16
    quant: Quant
    options: TorchOptions | MLXOptions

    @property
    def device(self) -> str:
        """PyTorch's device, settled by plan_load; MLX runs on its default device."""
        return self.options.device if isinstance(self.options, TorchOptions) else "mlx"


def plan_load(backend: str = "auto", dtype: str = "auto", quant: str | Quant = "none", *, name: str = "model",
              **options) -> LoadPlan:
    """The plan for loading a model (`name` for log messages) on `backend` with `options`: the
    fields of TorchOptions or MLXOptions. An option the chosen backend lacks is said in the
    log, unless it is that option's default (callers pass the server's settings to either)."""
    runtime = pick_backend(backend)
    if runtime == "torch":
        return _torch_plan(dtype, Quant.parse(quant, "torch"), options)
    quant = Quant.parse(quant, "mlx")
    if quant.scheme == "bf16":  # MLX runs bf16 throughout: its weights need no separate scheme
        quant, dtype = Quant(), "bfloat16"
    mlx_names = {f.name for f in dataclasses.fields(MLXOptions)}
    defaults = TorchOptions()
    ignored = sorted(k for k, v in options.items()
                     if k not in mlx_names and v != getattr(defaults, k) and not (k == "draft_quant" and not options.get("draft_dir")))
    if ignored:
        log.warning("%s: %s %s only the PyTorch backend's; MLX serves without", name, ", ".join(ignored),
                    "is" if len(ignored) == 1 else "are")
    return LoadPlan("mlx", dtype, quant, MLXOptions(**{k: v for k, v in options.items() if k in mlx_names}))


def _torch_plan(dtype: str, quant: Quant, options: dict) -> LoadPlan:
    """bf16 activations on the CPU run as float32, with one warning: the CPU's fast paths (the
    native decode plan, its int8/int4/bf16 kernels) take float32 activations, and with bf16
    ones a model fell back to ATen's ops at under half the speed (270M int4: 62 vs 141
    tok/s). Unquantized weights become bf16 (`--quant bf16`), so bf16 still halves them."""
    from elmd.engine.torch_backend import pick_device

    device = pick_device(options.pop("device", "auto"))
    if "draft_quant" in options:
        options["draft_quant"] = Quant.parse(options["draft_quant"], "torch")
    if device == "cpu" and dtype == "bfloat16":
        quant = Quant("bf16") if quant.is_none else quant
        log.warning("--dtype bfloat16 on the CPU: activations run in float32, which the CPU's fast kernels take; "
                    "weights as --quant %s", quant)
        dtype = "float32"
    return LoadPlan("torch", dtype, quant, TorchOptions(device=device, **options))
