"""`elmd status`: does the daemon answer, which models are loaded, how much memory they use
(from the daemon's GET /health and GET /v1/models)."""

from __future__ import annotations

import argparse
import json
import sys

from elmd import client


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "status",
        help="whether the daemon answers, its loaded models and memory",
        description="Ask the running daemon whether it is ready, which models it has loaded and how "
        "much memory they use. Exits 0 when it answers and is ready, 1 otherwise.",
    )
    parser.add_argument("--url", help="the daemon's address (default: from ELMD_HOST / ELMD_PORT / config)")
    parser.add_argument("--json", action="store_true", help="print the daemon's answers as JSON")
    parser.set_defaults(func=status)


def status(args: argparse.Namespace) -> int:
    url = client.base_url(args.url)
    try:
        health_code, health = client.get_json(url, "/health")
        models_code, models = client.get_json(url, "/v1/models")
    except client.DaemonUnreachable as error:
        if args.json:
            print(json.dumps({"url": url, "running": False}))
        else:
            print(f"elmd: not running ({error})")
        return 1
    except client.ClientError as error:
        print(f"elmd status: {error}", file=sys.stderr)
        return 1
    cards = models.get("data", []) if models_code == 200 else []
    ready = health_code == 200
    if args.json:
        print(json.dumps({"url": url, "running": True, "health": health, "models": cards}, indent=2))
        return 0 if ready else 1

    print(f"elmd: running at {url} ({health.get('status', health_code)})")
    if health.get("error"):
        print(f"error: {health['error']}")
    if models_code != 200:
        error = models.get("error", {}).get("message", f"HTTP {models_code}")
        print(f"models: not listed ({error})", file=sys.stderr)
    loaded = [card for card in cards if card.get("loaded")]
    print("loaded:" if loaded else "loaded: none")
    for card in loaded:
        details = [card.get("backend"), _size(card.get("memory_bytes")), _context(card.get("context_length"))]
        print(f"  {card['id']}  " + ", ".join(d for d in details if d))
    if health.get("loading"):
        print(f"loading: {', '.join(health['loading'])}")
    memory = sum(card.get("memory_bytes") or 0 for card in loaded)
    print(f"memory in use by models: {_size(memory)}")
    available = [card["id"] for card in cards if not card.get("loaded")]
    if available:
        print(f"available: {', '.join(available)}")
    return 0 if ready else 1


def _size(count: int | None) -> str | None:
    if not count:
        return None if count is None else "0 MiB"
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def _context(length: int | None) -> str | None:
    return f"context {length}" if length else None
