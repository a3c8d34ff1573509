"""Reading OpenELM checkpoints in the Hugging Face hub's layout.

`config.json` plus `model.safetensors`, or shards listed in `model.safetensors.index.json`.
Tensors are read one at a time from memory-mapped files straight into a model built on
the meta device, so the weights are never held twice. Any problem names the file and the
tensor, and nothing half-loaded survives the exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from elmd.engine.openelm import OpenELM, OpenELMConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def read_config(model_dir: Path) -> OpenELMConfig:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json in the model directory") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return OpenELMConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: _inside(model_dir, file, f"{index}: tensor {name}") for name, file in weight_map.items()}
    single = model_dir / SINGLE
    if not single.exists():
        raise CheckpointError(f"{model_dir}: no {SINGLE} or {INDEX}")
    single = _inside(model_dir, SINGLE, str(single))
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _inside(model_dir: Path, file: str, what: str) -> Path:
    """A weight file's real path, refused if it (or a symlink) leads out of the model directory."""
    path = (model_dir / file).resolve()
    if model_dir.resolve() not in path.parents:
        raise CheckpointError(f"{what} points outside the model directory ({file})")
    return path


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def iter_tensors(model_dir: Path, wanted: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors named in `wanted`, one at a time as stored, each checked
    against its expected shape; a missing one is refused before any is read."""
    files = weight_files(model_dir)
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for path in sorted(set(files[n] for n in wanted)):
        with _open(path) as f:
            for name in (n for n in wanted if files[n] == path):
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None
                if tuple(tensor.shape) != wanted[name]:
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the config needs {wanted[name]}"
                    )
                yield name, tensor


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> OpenELM:
    """Build the network from config.json and fill it from the safetensors files."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    with torch.device("meta"):
        model = OpenELM(cfg)
    state = {name: tensor.to(device=device, dtype=dtype)
             for name, tensor in iter_tensors(model_dir, expected_shapes(model))}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    # The RoPE tables are built on the CPU even in a meta-device module (see rope_tables).
    model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)
    return model.eval().requires_grad_(False)
