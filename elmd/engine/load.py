"""Loading a model directory into an `Engine`, by a LoadPlan (elmd.engine.plan)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from elmd.engine.engine import Engine
from elmd.engine.plan import LoadPlan, plan_load
from elmd.engine.tokenizer import Tokenizer


def load_engine(
    model_dir: str | Path,
    *,
    model_id: str | None = None,
    backend: str = "auto",
    dtype: str = "auto",
    quant: str = "none",
    chat_template: str | None = None,
    defaults: dict | None = None,
    **backend_options,
) -> Engine:
    """`backend_options`: fields of TorchOptions or MLXOptions (see plan_load)."""
    model_dir = Path(model_dir)
    model_id = model_id or model_dir.name
    tokenizer = Tokenizer.from_dir(model_dir, chat_template=chat_template)
    plan = plan_load(backend, dtype, quant, name=model_id, **backend_options)
    return Engine(model_id, build_backend(model_dir, plan), tokenizer, defaults)


def build_backend(model_dir: Path, plan: LoadPlan):
    """The plan's backend, given its own part of the plan only."""
    options = {field.name: getattr(plan.options, field.name) for field in dataclasses.fields(plan.options)}
    if plan.backend == "mlx":
        from elmd.engine.mlx_backend import MLXBackend

        return MLXBackend(model_dir, dtype=plan.dtype, quant=plan.quant, **options)
    from elmd.engine.torch_backend import TorchBackend

    return TorchBackend(model_dir, dtype=plan.dtype, quant=plan.quant, **options)
