"""`elmd status`: does the daemon answer, which models are loaded, how much memory they use,
which CPU kernels run them (from the daemon's GET /health and GET /v1/models), and what it
has been doing: requests, tokens/s over the last minute, time to first token p50/p95 (from
GET /metrics, the series a Prometheus server scrapes)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from elmd import client
from elmd.engine.protocol import describe_cpu_kernels


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "status",
        help="whether the daemon answers, its loaded models and memory",
        description="Ask the running daemon whether it is ready, which models it has loaded and how "
        "much memory they use, and how busy it has been (requests, tokens/s over the last minute, time to "
        "first token). Exits 0 when it answers and is ready, 1 otherwise.",
    )
    parser.add_argument("--url", help="the daemon's address (default: from ELMD_HOST / ELMD_PORT / config)")
    parser.add_argument("--json", action="store_true", help="print the daemon's answers as JSON")
    parser.set_defaults(func=status)


def status(args: argparse.Namespace) -> int:
    url = client.base_url(args.url)
    try:
        health_code, health = client.get_json(url, "/health")
        models_code, models = client.get_json(url, "/v1/models")
        figures = activity(client.get(url, "/metrics"))
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
        report = {"url": url, "running": True, "health": health, "models": cards,
                  "activity": asdict(figures) if figures else None}
        print(json.dumps(report, indent=2))
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
        details = [card.get("backend"), _size(card.get("memory_bytes")), _context(card.get("context_length")),
                   card.get("parent") and f"LoRA adapter of {card['parent']}"]
        print(f"  {card['id']}  " + ", ".join(d for d in details if d))
    kernels = describe_cpu_kernels(health)
    if kernels:
        print(f"CPU kernels: {kernels}")
    if health.get("loading"):
        print(f"loading: {', '.join(health['loading'])}")
    memory = sum(card.get("memory_bytes") or 0 for card in loaded if not card.get("parent"))  # a base counts its adapters
    print(f"memory in use by models: {_size(memory)}")
    available = [card["id"] for card in cards if not card.get("loaded")]
    if available:
        print(f"available: {', '.join(available)}")
    if figures:
        print(figures.describe())
    return 0 if ready else 1


@dataclass
class Activity:
    """The headline figures of the daemon's /metrics."""

    requests: int  # since start, every endpoint and status
    errors: int  # of those, answered with a status of 400 or more, less the loading answers below
    loading: int  # GET /health answered 503 while a model loaded: a client waiting, not an error
    running: int  # generations in progress
    queued: int  # requests waiting for a slot
    tokens_per_second: float  # generated, over the last minute
    generations: int  # since start
    ttft_p50: float | None  # seconds, estimated from the histogram's buckets
    ttft_p95: float | None

    def describe(self) -> str:
        lines = [
            f"requests: {self.requests} since start ({self.errors} with an error status"
            + (f", {self.loading} health checks while loading" if self.loading else "")
            + f"), {self.running} generating, {self.queued} queued",
            f"generated: {self.tokens_per_second:.1f} tokens/s over the last minute",
        ]
        if self.ttft_p50 is not None:
            lines.append(f"time to first token: p50 {_ms(self.ttft_p50)}, p95 {_ms(self.ttft_p95)} "
                         f"({self.generations} generations)")
        return "\n".join(lines)


def activity(response) -> Activity | None:
    """The figures from a GET /metrics response; None if the daemon has no metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    if response.status_code != 200:
        return None
    samples = [s for family in text_string_to_metric_families(response.text) for s in family.samples]

    def total(name: str) -> float:
        return sum(s.value for s in samples if s.name == name)

    requests = [s for s in samples if s.name == "elmd_requests_total"]
    loading = [s for s in requests if s.labels["endpoint"] == "/health" and s.labels["status"] == "503"]
    buckets: dict[float, float] = {}  # upper bound -> cumulative count, summed over models
    for s in samples:
        if s.name == "elmd_time_to_first_token_seconds_bucket":
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
    ttft = sorted(buckets.items())
    return Activity(
        requests=int(sum(s.value for s in requests)),
        errors=int(sum(s.value for s in requests if int(s.labels["status"]) >= 400 and s not in loading)),
        loading=int(sum(s.value for s in loading)),
        running=int(total("elmd_running_sequences")),
        queued=int(total("elmd_queued_requests")),
        tokens_per_second=total("elmd_generation_tokens_per_second"),
        generations=int(total("elmd_time_to_first_token_seconds_count")),
        ttft_p50=quantile(0.5, ttft),
        ttft_p95=quantile(0.95, ttft),
    )


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a Prometheus histogram, from its cumulative buckets (ascending upper
    bounds, the last +Inf), interpolated linearly within a bucket as PromQL's
    histogram_quantile does; None without observations."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower  # beyond the largest finite bound: that bound is all we know
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _size(count: int | None) -> str | None:
    if not count:
        return None if count is None else "0 MiB"
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _context(length: int | None) -> str | None:
    return f"context {length}" if length else None
