"""Checking and copying a local OpenELM checkpoint directory in the hub's layout.

The check reads only config.json and the safetensors headers, so it costs the same for
the 3B as for the 270M, and a directory the engine could not load never enters the store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from elmd.store import UnsafeModelFile, check_relative

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
OTHER_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointDirError(ValueError):
    """A directory that is not a loadable OpenELM checkpoint; the message names the file."""


def checkpoint_files(src: Path) -> list[str]:
    """The files of the checkpoint in `src` (relative names), after checking that they
    make a complete OpenELM model and a tokenizer."""
    config = _read_config(src)
    weights = _weight_files(src)
    tokenizer = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not tokenizer:
        raise CheckpointDirError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model)")
    _check_shapes(src, config, weights)
    others = [name for name in OTHER_FILES if (src / name).is_file()]
    return ["config.json", *weights, *tokenizer, *others]


def copy_checkpoint(src: Path, dst: Path) -> list[str]:
    """Check the checkpoint in `src` and copy its files (symlinks followed) into `dst`."""
    names = checkpoint_files(src)
    for name in names:
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, target)
    return names


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointDirError(f"{src}: no config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointDirError(f"{path}: not valid JSON ({e})") from None
    if config.get("model_type") != "openelm":
        raise CheckpointDirError(
            f"{path}: model_type {config.get('model_type')!r} is not supported: elmd serves 'openelm' "
            "checkpoints (convert llama-architecture models from GGUF with `elmd import FILE.gguf`)"
        )
    return config


def _weight_files(src: Path) -> list[str]:
    """The safetensors files, plus the index that lists them when the model is sharded."""
    index = src / INDEX
    if not index.is_file():
        if not (src / SINGLE).is_file():
            raise CheckpointDirError(f"{src}: no {SINGLE} or {INDEX}")
        return [SINGLE]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise CheckpointDirError(f"{index}: not a safetensors index ({e})") from None
    for shard in shards:
        try:
            check_relative(shard)
        except UnsafeModelFile as e:
            raise CheckpointDirError(f"{index}: {e}") from None
        if not (src / shard).is_file():
            raise CheckpointDirError(f"{index}: names {shard}, which is not in {src}")
    return [INDEX, *shards]


def _check_shapes(src: Path, config: dict, weights: list[str]) -> None:
    """Every tensor the config needs is present with the shape it needs."""
    import torch
    from safetensors import safe_open

    from elmd.engine.openelm import OpenELM, OpenELMConfig

    try:
        cfg = OpenELMConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointDirError(f"{src / 'config.json'}: {e}") from None
    with torch.device("meta"):
        wanted = {name: tuple(p.shape) for name, p in OpenELM(cfg).named_parameters()}
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in (w for w in weights if w != INDEX):
        try:
            with safe_open(str(src / file), framework="pt") as f:
                found.update({name: (tuple(f.get_slice(name).get_shape()), file) for name in f.keys()})
        except Exception as e:  # safetensors has its own error types for truncated or corrupt files
            raise CheckpointDirError(f"{src / file}: cannot read safetensors ({e})") from None
    missing = sorted(set(wanted) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointDirError(f"{src}: missing tensor {missing[0]}{more}")
    for name, shape in wanted.items():
        if found[name][0] != shape:
            raise CheckpointDirError(f"{src / found[name][1]}: tensor {name} has shape {found[name][0]}, the config needs {shape}")
