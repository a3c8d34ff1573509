"""The `elmd` command line. Each subcommand lives in `elmd.commands.<name>` and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "serve",
    "agent",
    "status",
    "chat",
    "run",
    "pull",
    "list",
    "show",
    "rm",
    "import_model",
    "key",
]


def build_parser() -> argparse.ArgumentParser:
    from elmd import __version__

    parser = argparse.ArgumentParser(
        prog="elmd", description="A private, on-device OpenELM server with an OpenAI-compatible API."
    )
    parser.add_argument("--version", action="version", version=f"elmd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"elmd.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
