"""Quantized weights stored beside a model's float weights (`elmd-<quant>.safetensors`):
written once, at install (`elmd pull`, `elmd import`) or by the first load of a new
`--quant`, and read by every later load without quantizing.

Writing reads the float checkpoint one tensor at a time and quantizes it before reading
the next, so the float model is never held; a load that has to quantize has a child process
write the file, so it leaves the daemon as small as a later load of the stored file. The file does not depend on the activation
dtype: layers are quantized from float32, float tensors (norms, an unquantized embedding)
are kept in float32 and cast at load, so a bf16 load and a float32 load share one file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable

import torch

from elmd.engine.checkpoint import CheckpointError, expected_shapes, iter_tensors, read_config
from elmd.engine.openelm import OpenELM
from elmd.engine.quantize import (BF16Linear, QuantizedEmbedding, QuantizedLinear, QuantSpec, empty_quantized,
                                  fill_quantized, parse_quant, quantized_metadata, stored_spec)
from elmd.quant import Quant

# A tensor as the checkpoint holds it (float), or already in the stored layout of its module
# (a GGUF's Q4_1 blocks, converted exactly).
Tensors = Iterable[tuple[str, "torch.Tensor | dict[str, torch.Tensor]"]]


def stored_path(model_dir: str | Path, quant: str | Quant | QuantSpec) -> Path:
    """Where `quant`'s weights are kept, named by what they hold (int4 and int4-g32 share
    one file), a name that mlx-lm's `model*.safetensors` glob skips."""
    return Path(model_dir) / f"elmd-{parse_quant(quant).name}.safetensors"


def skeleton(model_dir: str | Path, spec: QuantSpec) -> tuple[OpenELM, dict[str, tuple[int, ...]]]:
    """The network on the meta device with `spec`'s modules swapped in, and the float
    checkpoint's tensor shapes it is filled from."""
    with torch.device("meta"):
        model = OpenELM(read_config(Path(model_dir)))
    shapes = expected_shapes(model)
    return empty_quantized(model, spec), shapes


def quantized_state(model: OpenELM, tensors: Tensors, total: int, progress: bool = False) -> dict[str, torch.Tensor]:
    """The stored tensors of `model` (a skeleton from `skeleton`), quantizing each float
    tensor as it arrives; nothing but the result outlives one step."""
    from tqdm import tqdm

    modules = dict(model.named_modules())
    tied_head = isinstance(model.transformer.token_embeddings, QuantizedEmbedding)
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(tensors, total=total, disable=not progress, desc=f"quantizing ({model.quant_spec.name})",
               unit="tensor", file=sys.stderr)
    for name, tensor in bar:
        owner = "lm_head" if tied_head and name == "transformer.token_embeddings.weight" else name.rpartition(".")[0]
        module = modules.get(owner)
        if isinstance(tensor, dict):
            state.update({f"{owner}.{key}": value for key, value in tensor.items()})
        elif isinstance(module, QuantizedLinear):
            state.update({f"{owner}.{key}": value for key, value in module.scheme.quantize(tensor).items()})
        elif isinstance(module, BF16Linear):
            state[name] = tensor.to(torch.bfloat16)
        else:
            state[name] = tensor.float()
        del tensor
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise CheckpointError(f"no tensor for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return state


def write(model_dir: str | Path, quant: str | Quant, tensors: Tensors | None = None, progress: bool = False) -> Path:
    """Quantize the float checkpoint in `model_dir` (or `tensors`) into `stored_path`; returns it."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    spec = parse_quant(quant, embedding=True)
    model, shapes = skeleton(model_dir, spec)
    state = quantized_state(model, tensors if tensors is not None else iter_tensors(model_dir, shapes),
                            len(shapes), progress)
    path = stored_path(model_dir, spec)
    partial = path.with_suffix(".partial")
    save_file({name: t.contiguous() for name, t in state.items()}, str(partial), metadata=quantized_metadata(spec))
    os.replace(partial, path)
    return path


def load(model_dir: str | Path, quant: str | Quant, dtype: torch.dtype, device: str) -> OpenELM:
    """The model with `quant`'s weights, from the stored file. A missing file (or one of an
    older format) is written first by a child process, so this process never holds the float
    weights: freed or not, their pages would stay resident here (glibc keeps freed blocks of
    up to 32 MB in the heap). Where the directory is read-only, it quantizes here instead."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    spec = parse_quant(quant, embedding=True)
    path = stored_path(model_dir, spec)
    model, shapes = skeleton(model_dir, spec)
    if stored_spec(path) != spec and os.access(model_dir, os.W_OK):
        _write_in_child(model_dir, quant)
    if stored_spec(path) == spec:
        state = load_file(str(path), device=str(device))
    else:
        state = quantized_state(model, iter_tensors(model_dir, shapes), len(shapes))
    model = fill_quantized(model, state, dtype, device)
    model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)  # built on the CPU
    return model.eval().requires_grad_(False)


def _write_in_child(model_dir: Path, quant: str | Quant) -> None:
    import elmd

    package_root = str(Path(elmd.__file__).resolve().parent.parent)  # this elmd, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "elmd.engine.quant_store", str(model_dir), str(quant)], env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise CheckpointError(f"{model_dir}: quantizing as {quant} failed: {last}")


if __name__ == "__main__":  # python -m elmd.engine.quant_store MODEL_DIR QUANT
    write(sys.argv[1], sys.argv[2])
