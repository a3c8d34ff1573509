"""`elmd list`: the models installed in the store."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "list",
        help="list the models installed in the store",
        description="List the installed models with their size, the quantization they serve with (unless "
        "`elmd serve --quant` says otherwise), source and install date; a LoRA adapter with the model it adapts.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from elmd.catalog import serving_quant
    from elmd.registry import Registry
    from elmd.store import Store, human_size

    models = Store().list()
    registry = Registry.load()
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path), "size_bytes": m.size_bytes,
                           "quant": None if m.adapter_for else str(serving_quant(m, registry)),
                           "adapter_for": m.adapter_for, "manifest": m.manifest} for m in models], indent=2))
        return 0
    if not models:
        print("no models installed (try `elmd pull smollm2-135m-instruct`)")
        return 0
    rows = [("NAME", "SIZE", "QUANT", "SOURCE", "CREATED")]
    for m in models:
        if m.adapter_for:  # served over its base's weights, at the base's quant
            quant, source = "-", f"LoRA adapter of {m.adapter_for}, from {describe_source(m.manifest.get('source'))}"
        else:
            quant, source = str(serving_quant(m, registry)), describe_source(m.manifest.get("source"))
        rows.append((m.name, human_size(m.size_bytes), quant, source, m.manifest.get("created", "?")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def describe_source(source) -> str:
    if not isinstance(source, dict):
        return "?"
    if source.get("kind") == "hub":
        weights = source.get("weights", {})
        return f"{weights.get('hub')}@{(weights.get('commit') or '?')[:12]}"
    for key in ("package", "path"):
        if source.get(key):
            return f"{source.get('kind')}:{source[key]}"
    return str(source.get("kind", "?"))

