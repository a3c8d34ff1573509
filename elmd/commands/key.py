"""`elmd key`: the API key clients must send, kept in the config directory (mode 0600).

Once the file exists the daemon enforces it (also on loopback) and `elmd` commands send it."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "key",
        help="create or show the API key",
        description="Print the daemon's API key, creating the key file (mode 0600 in the config directory) if "
        "there is none. Clients send it as `Authorization: Bearer KEY`; it is required to serve beyond loopback.",
    )
    parser.add_argument("--new", action="store_true", help="replace the key with a new one (restart the daemon)")
    parser.add_argument("--path", action="store_true", help="print the key file's path instead of the key")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from elmd.auth import KeyFileError, create_key_file

    try:
        path, key = create_key_file(replace=args.new)
    except KeyFileError as exc:
        print(f"elmd key: {exc}", file=sys.stderr)
        return 1
    print(path if args.path else key)
    return 0
