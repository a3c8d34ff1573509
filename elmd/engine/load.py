"""Choosing a backend and loading a model directory into an `Engine`."""

from __future__ import annotations

import logging
from pathlib import Path

from elmd.choices import pick_backend
from elmd.engine.engine import Engine
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
    model_dir = Path(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, chat_template=chat_template)
    if pick_backend(backend) == "mlx":
        from elmd.engine.mlx_backend import MLXBackend

        if backend_options.get("draft_dir") is not None:
            logging.getLogger("elmd.server").warning(
                "%s: draft-model speculation runs on the PyTorch backend; on MLX the model decodes without a draft",
                model_id or model_dir.name)
        if quant == "bf16":  # MLX runs bf16 throughout; its weights need no separate scheme
            quant, dtype = "none", "bfloat16"

        runtime = MLXBackend(model_dir, dtype=dtype, quant=quant,
                             prefix_cache_bytes=backend_options.get("prefix_cache_bytes", 256 << 20))
    else:
        from elmd.engine.torch_backend import TorchBackend

        runtime = TorchBackend(model_dir, dtype=dtype, quant=quant, **backend_options)
    return Engine(model_id or model_dir.name, runtime, tokenizer, defaults)
