"""The contract between the HTTP service and a backend (PyTorch or MLX).

The service imports this module, `elmd.engine.engine` (a loaded model as it sees one,
grammars and chat templates included) and, to load a model, `elmd.engine.load`; it never
learns which runtime answers. A backend turns prompt token ids into generated token ids;
text (detokenization, stop strings, chat templates) is handled above it, once, for all
backends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator, Protocol

if TYPE_CHECKING:
    from elmd.engine.grammar import TokenMatcher


@dataclass(frozen=True)
class Constraint:
    """What the output must match (grammar-constrained decoding, elmd/engine/grammar.py):
    `kind` is "json_schema", "lark", "gbnf" or "regex", `source` its text (a schema as JSON)."""

    kind: str
    source: str

    @classmethod
    def json_schema(cls, schema: dict | bool) -> "Constraint":
        return cls("json_schema", json.dumps(schema))


@dataclass(frozen=True)
class SamplingParams:
    """Everything that shapes one generation. Defaults are the OpenAI API's."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1.0: off (multiplicative, as in CTRL / transformers)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and k alternatives
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's -100..100
    constraint: Constraint | None = None  # the output follows this grammar

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Any of the repetition, presence or frequency penalties on."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one token and the `top` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Step:
    """One generated token, as a backend reports it."""

    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    """The backend's last word on a sequence: why it stopped."""

    reason: str  # "length" | "eos" | "cancelled" | "error" | "memory" (the KV cache would pass the memory budget)
    error: str | None = None


class StepChannel:
    """A thread-safe pipe from a backend's worker thread to one consumer.

    The producer calls `put(Step)` then `close(Finished)`; the consumer iterates, from a
    thread or from asyncio. `cancel()` tells the producer to stop at its next step.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Step | Finished] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()
        self.finished: Finished | None = None
        self.cached_tokens = 0  # prompt tokens the backend reused from its prefix cache; set before the first step

    # producer side
    def put(self, item: Step | Finished) -> None:
        self._queue.put(item)
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def close(self, finished: Finished) -> None:
        self.put(finished)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # consumer side
    def cancel(self) -> None:
        self._cancelled.set()

    def _take(self, item: Step | Finished) -> Step | None:
        if isinstance(item, Finished):
            self.finished = item
            return None
        return item

    def __iter__(self) -> Iterator[Step]:
        while self.finished is None:
            step = self._take(self._queue.get())
            if step is not None:
                yield step

    async def __aiter__(self) -> AsyncIterator[Step]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        with self._lock:
            self._waiters.append((loop, ready))
        try:
            while self.finished is None:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._queue.empty():
                        await ready.wait()
                    continue
                step = self._take(item)
                if step is not None:
                    yield step
        finally:
            with self._lock:
                self._waiters.remove((loop, ready))


def context_length(config: dict) -> int:
    """The tokens a sequence may hold under an OpenELM config.json: its context, capped where
    its rotary embedding stops (Apple's defaults for a key it lacks). Both backends and the
    model routes ask this, so the three cannot disagree."""
    return min(config.get("max_context_length", 2048), config.get("rope_max_length", 4096))


@dataclass
class BackendInfo:
    """What a loaded backend tells the service about itself."""

    name: str  # "torch" | "mlx"
    device: str  # "cpu", "cuda:0", "mps", "mlx-cpu", "mlx-gpu"
    dtype: str
    quant: str  # "none" | "int8" | "int4" ...
    context_length: int
    vocab_size: int
    memory_bytes: int = 0  # the weights, measured at load
    # Runtime details; on the CPU, PyTorch's cpu_kernels, cpu_kernels_reason, cpu_kernels_building;
    # model_digest (the torch backend's digest of the checkpoint's config and weight files, sampled).
    extra: dict = field(default_factory=dict)

    @property
    def system_fingerprint(self) -> str:
        """What decides a reply's bits besides the request (OpenAI's `system_fingerprint`):
        backend, device, dtype, quant, CPU kernel path, KV cache dtype and model. Two replies
        under one fingerprint to the same greedy request are the same (where the kernel path is
        batch-invariant, see tests/test_batch_invariance.py); it changes, for instance, when the
        native kernels finish building and the model moves to them."""
        keys = ("cpu_kernels", "kv_cache_dtype", "model_digest")
        parts = [self.name, self.device, self.dtype, self.quant, *(str(self.extra.get(k)) for k in keys)]
        return "fp_" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CacheBytes:
    """Memory a backend holds beside its weights: the KV cache of running sequences, and
    the prefix cache of earlier ones kept for reuse."""

    kv_cache: int
    prefix_cache: int = 0


def describe_cpu_kernels(state: dict) -> str | None:
    """"aten (this CPU lacks ...)": a backend's CPU kernel path and why not the best, for the
    daemon's log and `elmd status` (a BackendInfo's extra, or GET /health's fields); None off the CPU."""
    if not state.get("cpu_kernels"):
        return None
    why = state.get("cpu_kernels_reason")
    return state["cpu_kernels"] + (f" ({why})" if why else "")


class Backend(Protocol):
    """A model loaded on one runtime. Methods are safe to call from any thread."""

    info: BackendInfo

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
               matcher: "TokenMatcher | None" = None) -> StepChannel:
        """Start generating after `prompt_ids`; steps arrive on the returned channel.

        With a `matcher` (made from `params.constraint`), each token is drawn from those
        the matcher allows, and the matcher is told each chosen token.

        The backend stops at `max_tokens`, at a token in `stop_ids` (unless
        `params.ignore_eos`), or when the channel is cancelled, and always ends the
        channel with `Finished`. A token in `stop_ids` is reported, then `Finished("eos")`.
        """
        ...

    def score(self, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        """Log-probability of each token given those before it (len(token_ids) - 1 entries)."""
        ...

    # LoRA adapters (both backends; optional for test doubles): `submit` and `score` then take
    # `adapter=name` to generate with one.
    #   load_adapter(name, directory) -> int: read and serve the adapter, its bytes (AdapterError: it does not fit).
    #   unload_adapter(name) -> bool: drop it, unless a sequence still uses it (False).

    def cache_bytes(self) -> CacheBytes:
        """What the caches hold now (read for the metrics and the memory budget; safe to call
        while generating, never waits for a step)."""
        ...

    def speculated_tokens(self) -> tuple[int, int]:
        """(proposed, accepted): speculative tokens verified since load, and of them the ones
        the target model confirmed ((0, 0) for a backend that does not speculate)."""
        ...

    def limit_cache(self, budget: Callable[[], int | None]) -> None:
        """Keep the KV cache (and cached prefixes) within `budget()` bytes, a figure that changes as
        other models load and grow; what cannot fit ends with Finished("memory")."""
        ...

    def close(self) -> None:
        """Stop the worker and free the weights."""
        ...
