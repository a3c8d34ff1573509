"""Deterministic OpenELM checkpoints in the hub's layout, for tests, benchmarks and newcomers.

`write_checkpoint(dir, "270M")` writes config.json (the real instruct model's config),
random weights from a fixed seed, and a small working LLaMA-style tokenizer. The same
arguments always give the same bytes.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from elmd.engine.fixture_tokenizer import write_tokenizer
from elmd.engine.openelm import OpenELM, OpenELMConfig

SHAPES = {
    "270M": "apple/OpenELM-270M-Instruct",
    "450M": "apple/OpenELM-450M-Instruct",
    "1.1B": "apple/OpenELM-1_1B-Instruct",
    "3B": "apple/OpenELM-3B-Instruct",
}

# Small enough for a test to run in milliseconds, yet with every feature of the real
# configs: per-layer head counts, GQA, QK-norm, varying FFN widths, tied head.
TINY = {
    "model_type": "openelm",
    "architectures": ["OpenELMForCausalLM"],
    "vocab_size": 1024,
    "model_dim": 128,
    "head_dim": 32,
    "num_transformer_layers": 3,
    "num_query_heads": [4, 4, 8],
    "num_kv_heads": [1, 2, 2],
    "num_gqa_groups": 4,
    "ffn_multipliers": [0.5, 1.5, 2.5],
    "ffn_dim_divisor": 64,
    "ffn_with_glu": True,
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
    "rope_freq_constant": 10000,
    "rope_max_length": 4096,
    "max_context_length": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def reference_configs() -> dict:
    """The config.json of each OpenELM-Instruct model (with `_derived` facts), shipped as data."""
    return json.loads(resources.files("elmd").joinpath("data/openelm-configs.json").read_text())


def config_for(shape: str) -> dict:
    if shape == "tiny":
        return dict(TINY)
    if shape not in SHAPES:
        raise ValueError(f"unknown fixture shape {shape!r}; choose tiny or one of {', '.join(SHAPES)}")
    cfg = dict(reference_configs()[SHAPES[shape]])
    cfg.pop("_derived")
    return cfg


def random_state_dict(cfg: OpenELMConfig, seed: int) -> dict[str, np.ndarray]:
    """Weights drawn in a fixed order from one seeded generator: N(0, 0.02) for matrices,
    1 + N(0, 0.1) for norm scales (so a norm's weight matters in parity tests)."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in OpenELM(cfg).named_parameters()}
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            state[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        else:
            state[name] = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return state


def write_checkpoint(
    out_dir: str | Path,
    shape: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    config_overrides: dict | None = None,
) -> Path:
    """Write a deterministic checkpoint of `shape` into `out_dir` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = {**config_for(shape), **(config_overrides or {}), "torch_dtype": dtype}
    cfg = OpenELMConfig.from_dict(raw)
    torch_dtype = getattr(torch, dtype)
    tensors = {k: torch.from_numpy(v).to(torch_dtype) for k, v in random_state_dict(cfg, seed).items()}
    names = sorted(tensors)
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
            save_file(part, str(out / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    write_tokenizer(out)
    return out
