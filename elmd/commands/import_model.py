"""`elmd import FILE.gguf|DIR [--name NAME]`: install a local model into the store.

A GGUF file is converted to an OpenELM checkpoint (see `elmd.convert.gguf`); a directory
in the hub's layout is checked and copied. Either way the store sees the model only once
it is complete. With `--adapter-for BASE` the directory is a LoRA adapter (mlx-lm's or
PEFT's), checked against the installed BASE and kept as a model of its own over it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from elmd.choices import QUANTS, pick_backend

# The file-type tags llama.cpp's tools append to GGUF names ("model.Q4_1.gguf", "model-f16.gguf").
QUANT_SUFFIX = re.compile(r"[.-](q\d[a-z0-9_]*|iq\d[a-z0-9_]*|f16|bf16|f32)$")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import",
        help="install a local GGUF file or hub-layout checkpoint directory",
        description=(
            "Install a model from this machine into the store. A llama-architecture GGUF file is "
            "converted to an OpenELM checkpoint; a directory in the Hugging Face hub's layout "
            "(config.json, safetensors, tokenizer) is checked and copied."
        ),
    )
    parser.add_argument("source", type=Path, help="a .gguf file or a checkpoint directory")
    parser.add_argument("--name", help="the model's name in the store (default: from the file or folder name)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weight type for a converted GGUF"
    )
    parser.add_argument("--quant", choices=QUANTS,
                        help="also store the weights quantized this way, so no load has to (default: the "
                        "default_quant of the models.yaml entry of that name, else none; stored where the PyTorch backend "
                        "runs, as `elmd pull` does: MLX quantizes as it loads; int4 keeps a GGUF's Q4_1 blocks exactly)")
    parser.add_argument("--adapter-for", metavar="BASE",
                        help="the directory is a LoRA adapter of the installed model BASE (mlx-lm's `mlx_lm.lora "
                        "--adapter-path` folder or PEFT's save_pretrained): checked against BASE and kept under NAME, "
                        "which the daemon then serves as a model of its own over BASE")
    parser.add_argument("--force", action="store_true", help="replace a model of the same name")
    parser.set_defaults(func=run)


def default_name(source: Path) -> str:
    """A store name from a file or folder name: 'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'smollm2-135m-instruct'."""
    stem = source.name[: -len(".gguf")] if source.name.lower().endswith(".gguf") else source.name
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return QUANT_SUFFIX.sub("", name) or "model"


def run(args: argparse.Namespace) -> int:
    from elmd.catalog import default_quant
    from elmd.convert import UnsupportedModelError, UnsupportedTokenizerError
    from elmd.convert.checkpoint_dir import CheckpointDirError
    from elmd.registry import Registry
    from elmd.store import InvalidModelName, ModelNotFound

    source: Path = args.source.expanduser()
    if args.adapter_for and args.quant:
        print("elmd import: error: --quant does not apply to an adapter: it is served over its base's weights, "
              "quantized as the base is", file=sys.stderr)
        return 2
    try:
        name = args.name or default_name(source)
        quant = args.quant or default_quant(Registry.load().get(name))
        if args.adapter_for:
            installed = _install_adapter(source, name, args.adapter_for, args.force)
        elif source.is_dir():
            installed = _install_dir(source, name, quant, args.force)
        elif source.is_file():
            installed = _install_gguf(source, name, args.dtype, quant, args.force)
        else:
            raise FileNotFoundError(f"{source}: no such file or directory")
    except FileExistsError as e:
        print(f"elmd import: error: {e}; pass --force to replace it", file=sys.stderr)
        return 1
    except (
        FileNotFoundError,
        InvalidModelName,
        ModelNotFound,
        UnsupportedModelError,
        UnsupportedTokenizerError,
        CheckpointDirError,
        AdapterImportError,
    ) as e:
        print(f"elmd import: error: {e}", file=sys.stderr)
        return 1
    print(f"installed {name} in {installed}" + (f" (a LoRA adapter of {args.adapter_for})" if args.adapter_for else ""))
    return 0


class AdapterImportError(ValueError):
    """An adapter that cannot be kept for the base it was given; the message says why."""


def _install_adapter(source: Path, name: str, base: str, force: bool) -> Path:
    """Check the adapter in `source` against `base`'s config (as serving it would), then copy the
    files it is read from: not mlx-lm's training checkpoints beside them."""
    from elmd.engine.checkpoint import CheckpointError, read_config
    from elmd.engine.lora import LAYOUTS, AdapterError, read_adapter
    from elmd.store import Store, write_manifest

    store = Store()
    if name == base:
        raise AdapterImportError(f"the adapter needs a name of its own (--name), not its base's {base!r}")
    stored = store.get(base)
    if stored.adapter_for:
        raise AdapterImportError(f"{base!r} is a LoRA adapter itself (of {stored.adapter_for!r}): give the model it adapts")
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such adapter directory")
    try:
        adapter = read_adapter(source, read_config(stored.path), name)
    except (AdapterError, CheckpointError) as e:
        raise AdapterImportError(f"not an adapter of {base}: {e}") from None
    with store.installing(name, overwrite=force) as tmp:
        for file in ("adapter_config.json", LAYOUTS[adapter.format].file):
            shutil.copyfile(source / file, tmp / file)
        write_manifest(tmp, source={"kind": "local-dir", "path": str(source.resolve())}, revision=None,
                       adapter_for=base, adapter_format=adapter.format, adapter_kind=adapter.kind, adapter_rank=adapter.rank)
    return store.path(name)


def _install_gguf(source: Path, name: str, dtype: str, quant: str, force: bool) -> Path:
    from elmd.convert import import_gguf
    from elmd.pull import stored_quant
    from elmd.store import Store, sha256_file, write_manifest

    store = Store()
    stored = stored_quant(quant, pick_backend())
    with store.installing(name, overwrite=force) as tmp:
        print(f"converting {source} ...", file=sys.stderr)
        import_gguf(source, tmp, dtype=dtype, quant=stored, progress=True)
        write_manifest(
            tmp,
            source={"kind": "gguf-file", "path": str(source.resolve()), "sha256": sha256_file(source)},
            revision=None,
            quant=stored,
            dtype=dtype,
            default_quant=quant,
        )
    return store.path(name)


def _install_dir(source: Path, name: str, quant: str, force: bool) -> Path:
    from elmd.convert.checkpoint_dir import copy_checkpoint
    from elmd.engine import quant_store
    from elmd.pull import stored_quant
    from elmd.store import Store, write_manifest

    store = Store()
    stored = stored_quant(quant, pick_backend())
    with store.installing(name, overwrite=force) as tmp:
        copy_checkpoint(source, tmp)
        if not stored.is_none:
            quant_store.write(tmp, stored, progress=True)
        write_manifest(tmp, source={"kind": "local-dir", "path": str(source.resolve())}, revision=None,
                       quant=stored, default_quant=quant)
    return store.path(name)
