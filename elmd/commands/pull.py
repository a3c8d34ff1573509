"""`elmd pull MODEL`: download a model that models.yaml names into the store."""

from __future__ import annotations

import argparse
import sys

from elmd.choices import BACKENDS, QUANTS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="download a model named in models.yaml into the store",
        description=(
            "Download a model that models.yaml names from the Hugging Face hub (no token needed), "
            "check every file against the hub's hashes and install it into the store. An interrupted "
            "pull leaves nothing installed; running it again resumes the download. The offline "
            "default (a GGUF shipped in a Python package) is converted instead of downloaded."
        ),
    )
    parser.add_argument("model", help="a model id from models.yaml, e.g. openelm-270m-instruct")
    parser.add_argument("--revision", help="branch, tag or commit of the weights repo (default: models.yaml's, else main)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="which backend's source to download (default: auto)")
    parser.add_argument("--quant", choices=QUANTS,
                        help="also store the weights quantized this way, so no load has to (default: the model's default_quant)")
    parser.add_argument("--force", action="store_true", help="replace the model if it is already installed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import httpx2

    from elmd.pull import PullError, pull
    from elmd.registry import Registry
    from elmd.store import Store

    try:
        registry = Registry.load()
        entry = registry.get(args.model)
        if entry is None:
            known = ", ".join(e.id for e in registry)
            raise PullError(f"models.yaml has no model {args.model!r} (known: {known})")
        pull(args.model, entry, Store(), revision=args.revision, progress=not args.quiet,
             backend=args.backend, overwrite=args.force, quant=args.quant)
    except KeyboardInterrupt:
        print("\nelmd pull: interrupted; nothing was installed. Run it again to resume.", file=sys.stderr)
        return 130
    except httpx2.TransportError as e:
        from huggingface_hub import constants

        print(f"elmd pull: error: cannot reach the hub at {constants.ENDPOINT} ({e}); run it again to resume",
              file=sys.stderr)
        return 1
    except (PullError, ValueError, OSError, httpx2.HTTPError) as e:
        print(f"elmd pull: error: {e}", file=sys.stderr)
        return 1
    return 0
