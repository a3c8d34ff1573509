"""GET /metrics: what the daemon is doing, in Prometheus' text format (prometheus-client).

Three sources, each hooked in at its narrowest point:
- requests by endpoint and status: ASGI middleware outside the security checks, so 401s,
  403s and 413s count too; the endpoint label is the matched route's path template
  (`/v1/models/{model_id}`) or `other`, never the raw path;
- tokens and timings: the watch every loaded engine reports its generations to (start,
  each token, end), whichever route started them;
- queue, loaded models, caches, loads and unloads: read from the model manager at scrape.

Every label is bounded: model ids come from the store (or `serve --model`), endpoints from
the routes, statuses from HTTP. Prompt text never becomes a label.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elmd.server.manager import ModelManager

RATE_WINDOW_SECONDS = 60  # the window of elmd_generation_tokens_per_second (what `elmd status` shows)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

router = APIRouter()


class RecentRate:
    """Events per second over the last `seconds`, kept as per-second counts."""

    def __init__(self, seconds: int):
        self.seconds = seconds
        self._counts: collections.deque[list[int]] = collections.deque()  # [second, count], oldest first
        self._lock = threading.Lock()

    def add(self, now: float) -> None:
        second = int(now)
        with self._lock:
            if self._counts and self._counts[-1][0] == second:
                self._counts[-1][1] += 1
            else:
                self._counts.append([second, 1])
                self._trim(second)

    def per_second(self, now: float) -> float:
        with self._lock:
            self._trim(int(now))
            return sum(count for _, count in self._counts) / self.seconds

    def _trim(self, second: int) -> None:
        while self._counts and self._counts[0][0] <= second - self.seconds:
            self._counts.popleft()


class Metrics:
    """The daemon's series, in a registry of its own (so two apps in one process never share)."""

    def __init__(self, manager: ModelManager):
        disable_created_metrics()  # no `_created` twin of every counter: start times are not asked for
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("elmd_requests", "HTTP requests by endpoint (route template) and status",
                                ["endpoint", "status"], registry=registry)
        self.rate_limited = Counter("elmd_rate_limited_requests", "Requests refused with 429 (queue full)",
                                    registry=registry)
        self.prompt_tokens = Counter("elmd_prompt_tokens", "Prompt tokens of generations", ["model"], registry=registry)
        self.generation_tokens = Counter("elmd_generation_tokens", "Generated tokens", ["model"], registry=registry)
        self.prefix_cache_hit_tokens = Counter("elmd_prefix_cache_hit_tokens",
                                               "Prompt tokens whose keys and values came from the prefix cache",
                                               ["model"], registry=registry)
        self.ttft = Histogram("elmd_time_to_first_token_seconds",
                              "From a generation's start (its prompt queued) to its first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram("elmd_time_per_output_token_seconds",
                              "Mean time between a generation's tokens after the first", ["model"],
                              buckets=TPOT_BUCKETS, registry=registry)
        self.running = Gauge("elmd_running_sequences", "Generations in progress", ["model"], registry=registry)
        self.recent_tokens = RecentRate(RATE_WINDOW_SECONDS)
        tokens_per_second = Gauge("elmd_generation_tokens_per_second",
                                  f"Generated tokens per second over the last {RATE_WINDOW_SECONDS} s", registry=registry)
        tokens_per_second.set_function(lambda: self.recent_tokens.per_second(time.monotonic()))
        self._prompt_totals: collections.Counter[str] = collections.Counter()
        self._hit_totals: collections.Counter[str] = collections.Counter()
        registry.register(_ManagerCollector(manager, self))
        manager.generation_watch = self.watch

    def watch(self, model: str, prompt_tokens: int) -> "_Watch":
        return _Watch(self, model, prompt_tokens)

    def prompt(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        """A generation's prompt, of which `cached_tokens` came from the prefix cache."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.prefix_cache_hit_tokens.labels(model).inc(cached_tokens)
        self._prompt_totals[model] += prompt_tokens
        self._hit_totals[model] += cached_tokens

    def hit_ratio(self, model: str) -> float:
        """Share of prompt tokens served from the prefix cache since start."""
        prompts = self._prompt_totals[model]
        return self._hit_totals[model] / prompts if prompts else 0.0

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status == 429:
            self.rate_limited.inc()


class _Watch:
    """One generation's timings and counts (engine.GenerationWatch). `token` runs once per
    generated token, so it touches only this model's series, looked up once here."""

    def __init__(self, metrics: Metrics, model: str, prompt_tokens: int):
        self.metrics, self.model, self.prompt_tokens = metrics, model, prompt_tokens
        self.generated = metrics.generation_tokens.labels(model)
        self.running = metrics.running.labels(model)
        self.started = time.monotonic()
        self.first = self.last = 0.0
        self.tokens = 0
        self.running.inc()

    def token(self) -> None:
        now = time.monotonic()
        if self.tokens == 0:
            self.first = now
            self.metrics.ttft.labels(self.model).observe(now - self.started)
        self.last = now
        self.tokens += 1
        self.generated.inc()
        self.metrics.recent_tokens.add(now)

    def end(self, cached_tokens: int) -> None:
        self.running.dec()
        self.metrics.prompt(self.model, self.prompt_tokens, cached_tokens)
        if self.tokens > 1:
            self.metrics.tpot.labels(self.model).observe((self.last - self.first) / (self.tokens - 1))


class _ManagerCollector:
    """Series read from the model manager when scraped."""

    def __init__(self, manager: ModelManager, metrics: Metrics):
        self.manager, self.metrics = manager, metrics

    def collect(self):
        manager = self.manager
        queued = GaugeMetricFamily("elmd_queued_requests", "Requests waiting for a generation slot")
        queued.add_metric([], manager.queued())
        loaded = GaugeMetricFamily("elmd_model_memory_bytes", "Loaded models and their memory (weights, KV cache, prefix cache)",
                                   labels=["model"])
        kv = GaugeMetricFamily("elmd_kv_cache_bytes", "KV cache of running sequences", labels=["model"])
        prefix = GaugeMetricFamily("elmd_prefix_cache_bytes", "Prefix cache (earlier sequences kept for reuse)",
                                   labels=["model"])
        hit_ratio = GaugeMetricFamily("elmd_prefix_cache_hit_ratio",
                                      "Share of prompt tokens served from the prefix cache since start", labels=["model"])
        proposed = CounterMetricFamily("elmd_speculative_tokens_proposed",
                                       "Speculated tokens verified by the model since it loaded", labels=["model"])
        accepted = CounterMetricFamily("elmd_speculative_tokens_accepted",
                                       "Speculated tokens the model confirmed since it loaded", labels=["model"])
        for model, engine in manager.loaded().items():
            try:
                caches = engine.cache_bytes()
            except RuntimeError:  # unloaded while this scrape ran
                continue
            speculated = engine.speculated_tokens()
            proposed.add_metric([model], speculated[0])
            accepted.add_metric([model], speculated[1])
            loaded.add_metric([model], engine.resident_bytes())
            kv.add_metric([model], caches.kv_cache)
            prefix.add_metric([model], caches.prefix_cache)
            hit_ratio.add_metric([model], self.metrics.hit_ratio(model))
        loads = CounterMetricFamily("elmd_model_loads", "Models loaded", labels=["model"])
        for model, count in manager.loads.items():
            loads.add_metric([model], count)
        unloads = CounterMetricFamily("elmd_model_unloads", "Models unloaded (idle, evicted or at shutdown)",
                                      labels=["model"])
        for model, count in manager.unloads.items():
            unloads.add_metric([model], count)
        yield from (queued, loaded, kv, prefix, hit_ratio, proposed, accepted, loads, unloads)


class RequestCounter:
    """Counts every HTTP request by endpoint and status, as the response starts."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self._routes: list[BaseRoute] | None = None  # the app's routes, flattened on first use

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._routes is None:
            self._routes = list(_flatten(scope["app"].router.routes))
        endpoint = _endpoint(self._routes, scope)
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.request(endpoint, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # the server's last-resort handler answers 500
                self.metrics.request(endpoint, 500)
            raise


def _flatten(routes) -> Iterator[BaseRoute]:
    for route in routes:
        included = getattr(route, "original_router", None)  # newer FastAPI wraps each included router
        yield from _flatten(included.routes) if included is not None else (route,)


def _endpoint(routes: list[BaseRoute], scope: Scope) -> str:
    """The route template the request is for (also when a method is not allowed), else `other`."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return route.path
    return "other"


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Synchronous on purpose: FastAPI runs it in a worker thread, and reading an MLX
    backend's caches waits for its worker between two steps."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, manager: ModelManager) -> None:
    """The series, the route and the counting middleware (add it last: it runs first)."""
    app.state.metrics = Metrics(manager)
    app.include_router(router)
    app.add_middleware(RequestCounter, metrics=app.state.metrics)
