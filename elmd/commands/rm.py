"""`elmd rm MODEL`: delete an installed model from the store."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rm",
        help="remove installed models from the store",
        description="Delete installed models and their files from the store (models.yaml is unchanged).",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="a model's name in the store")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from elmd.store import ModelNotFound, Store

    store = Store()
    status = 0
    for name in args.models:
        try:
            store.remove(name)
        except (ModelNotFound, ValueError) as e:
            print(f"elmd rm: error: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"removed {name}")
    return status
