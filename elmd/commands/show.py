"""`elmd show MODEL`: where an installed model came from and what it holds."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "show",
        help="show an installed model's source, revision, quantization, sampling defaults and files",
        description="Show an installed model's manifest (source, revision, quantization, files and their "
        "sha256) and the sampling defaults models.yaml gives it.",
    )
    parser.add_argument("model", help="the model's name in the store")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from elmd.catalog import serving_quant
    from elmd.commands.list import describe_source
    from elmd.registry import Registry
    from elmd.store import ModelNotFound, Store, human_size

    try:
        model = Store().get(args.model)
    except (ModelNotFound, ValueError) as e:
        print(f"elmd show: error: {e}", file=sys.stderr)
        return 1
    manifest = model.manifest
    registry = Registry.load()
    entry = registry.get(model.name.split(":")[0])
    sampling = dict(entry.sampling) if entry else {}
    serves_as = None if model.adapter_for else str(serving_quant(model, registry))  # an adapter: its base's
    if args.json:
        print(json.dumps({"name": model.name, "path": str(model.path), "size_bytes": model.size_bytes,
                          "default_quant": serves_as, "sampling": sampling, "adapter_for": model.adapter_for,
                          "manifest": manifest}, indent=2))
        return 0
    print(f"name:      {model.name}")
    print(f"path:      {model.path}")
    print(f"size:      {human_size(model.size_bytes)}")
    print(f"source:    {describe_source(manifest.get('source'))}")
    print(f"revision:  {manifest.get('revision')}")
    if model.adapter_for:
        print(f"adapter:   LoRA adapter of {model.adapter_for} ({manifest.get('adapter_kind', 'lora')}, rank "
              f"{manifest.get('adapter_rank', '?')}, {manifest.get('adapter_format', '?')} layout), served over its weights")
    else:
        print(f"quant:     {model.quant} stored (serves as {serves_as} unless --quant says otherwise)")
        defaults = ", ".join(f"{key}={value}" for key, value in sampling.items()) or "the API's"
        print(f"sampling:  {defaults} (when a request leaves them out)")
    print(f"created:   {manifest.get('created', '?')}")
    files = sorted(manifest.get("files", {}).items())
    print("files:")
    width = max((len(name) for name, _ in files), default=0)
    for name, info in files:
        print(f"  {name.ljust(width)}  {human_size(info.get('size', 0)):>9}  sha256:{info.get('sha256')}")
    return 0
