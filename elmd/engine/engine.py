"""A loaded model as the service sees it: tokenizer + backend + text handling.

Backends produce token ids; this layer turns them into text once, for every backend:
incremental detokenization, stop strings that may span tokens (never emitted), EOS,
and the usage counts the API reports. Whoever watches generations (the service's metrics)
sees each one start, each token, and its end, through `Engine.watch`.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Iterator, Protocol

from elmd.engine.grammar import GrammarError  # noqa: F401  (raised by Engine.grammar and compile_constraint; the server catches it from here)
from elmd.engine.grammar import GrammarCompiler, TokenMatcher, grammar_of
from elmd.engine.protocol import (Backend, BackendInfo, CacheBytes, Constraint, Finished, SamplingParams, Step,
                                  StepChannel, TokenLogprob)
from elmd.engine.tokenizer import Tokenizer


class MemoryBudgetError(RuntimeError):
    """The KV cache this generation needs would pass the daemon's memory budget."""


class ContextLengthError(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        self.prompt_tokens, self.max_tokens, self.context_length = prompt_tokens, max_tokens, context_length
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens."
        )


@dataclass
class Chunk:
    """New text from one or more tokens. The last chunk of a stream has `finish_reason`."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" (OpenAI's words)
    usage: "Usage | None" = None
    stop_sequence: str | None = None  # the stop string that ended the generation (Anthropic's API names it)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str
    usage: Usage
    stop_sequence: str | None = None


class GenerationWatch(Protocol):
    """One generation as an observer sees it: a call per generated token, then one at the end
    (finished, stopped or cancelled), with the prompt tokens the backend reused."""

    def token(self) -> None: ...

    def end(self, cached_tokens: int) -> None: ...


class _Unwatched:
    def token(self) -> None:
        pass

    def end(self, cached_tokens: int) -> None:
        pass


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could begin one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.pending = ""
        self.matched: str | None = None  # the stop string found (the earliest in the text)

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        found = [(at, stop) for stop in self.stops if (at := self.pending.find(stop)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda hit: hit[0])
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = self._partial_tail()
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False

    def _partial_tail(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        for n in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def compile_constraint(constraint: Constraint) -> None:
    """Compile `constraint` without a model (GrammarError when it cannot be followed), so a
    request's schema is refused by name before any model loads."""
    grammar_of(constraint)


def chat_template_of(model_dir: str | Path, chat_template: str | None = None) -> str:
    """The chat template a model directory's tokenizer applies (`chat_template` overrides it)."""
    return Tokenizer.from_dir(model_dir, chat_template).chat_template


@dataclass
class LoadedAdapter:
    directory: Path
    stamp: str  # its files' names, sizes and modification times: a new stamp (an import --force) reloads it
    nbytes: int
    last_used: float
    # Seconds unused before it unloads, as its last request's keep_alive said (Ollama's, on the
    # adapter's own model id); None: never. Unset (keep_alive_given False): the base model's.
    keep_alive: float | None = None
    keep_alive_given: bool = False

    def idle_past(self, now: float, base_keep_alive: float | None) -> bool:
        limit = self.keep_alive if self.keep_alive_given else base_keep_alive
        return limit is not None and now - self.last_used >= limit


def adapter_stamp(directory: Path) -> str:
    files = sorted(p for p in Path(directory).iterdir() if p.is_file()) if Path(directory).is_dir() else []
    return hashlib.sha256(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()[:16]


class Engine:
    """One servable model. Thread-safe; generations run concurrently in the backend.

    A LoRA adapter served over this model is a view of it (`with_adapter`): the same backend,
    tokenizer and weights, generating with the adapter's rows added."""

    kind = "generator"  # beside elmd/engine/embedding.py's "embedding"
    adapter: str | None = None  # the LoRA adapter this view generates with (None: the base model)

    def __init__(
        self,
        model_id: str,
        backend: Backend,
        tokenizer: Tokenizer,
        defaults: dict | None = None,
    ):
        self.model_id = model_id
        self.backend = backend
        self.tokenizer = tokenizer
        self.defaults = defaults or {}  # per-model sampling defaults from models.yaml
        self._grammar: GrammarCompiler | None = None  # made on the first constrained request
        self._grammar_lock = threading.Lock()
        # Called with a generation's prompt length as it starts; the service sets it to count
        # tokens and time them, so every route that generates is measured in one place.
        self.watch: Callable[[int], GenerationWatch] = lambda prompt_tokens: _Unwatched()
        self.adapters: dict[str, LoadedAdapter] = {}  # shared by the views
        self._adapters_lock = threading.Lock()

    def with_adapter(self, name: str, directory: Path) -> "Engine":
        """A view generating with the LoRA adapter in `directory` as model `name`, loaded into the
        backend on first use (the base is not reloaded). Raises elmd.engine.lora.AdapterError when
        it does not fit this model, NotImplementedError on a backend without adapters."""
        stamp = adapter_stamp(directory)
        with self._adapters_lock:
            loaded = self.adapters.get(name)
            if loaded is not None and (loaded.directory, loaded.stamp) != (Path(directory), stamp):
                # the name now means other files: reload once its running sequences let it go
                if self.backend.unload_adapter(name):
                    del self.adapters[name]
                    loaded = None
            if loaded is None:
                load = getattr(self.backend, "load_adapter", None)
                if load is None:
                    raise NotImplementedError(f"the {self.info.name} backend serves no LoRA adapters")
                loaded = self.adapters[name] = LoadedAdapter(Path(directory), stamp, load(name, Path(directory)), 0.0)
            loaded.last_used = time.monotonic()
        view = copy.copy(self)
        view.model_id, view.adapter = name, name
        return view

    def drop_idle_adapters(self, base_keep_alive: float | None) -> list[str]:
        """Unload the adapters unused past their keep-alive (their own, else the base model's)
        that no sequence holds; their names."""
        now = time.monotonic()
        return [name for name, loaded in list(self.adapters.items())
                if loaded.idle_past(now, base_keep_alive) and self.drop_adapter(name)]

    def drop_adapter(self, name: str) -> bool:
        """Unload adapter `name` unless a sequence still uses it; whether it is gone."""
        with self._adapters_lock:
            if name not in self.adapters:
                return True
            if not self.backend.unload_adapter(name):
                return False
            del self.adapters[name]
            return True

    def keep_adapter_alive(self, name: str, seconds: float | None) -> None:
        """Adapter `name` unloads after `seconds` unused from now on (a request's keep_alive)."""
        with self._adapters_lock:
            if (loaded := self.adapters.get(name)) is not None:
                loaded.keep_alive, loaded.keep_alive_given = seconds, True

    @property
    def info(self) -> BackendInfo:
        """What the backend says of itself (runtime, device, sizes, CPU kernel path): the
        service reads it here and never reaches into the backend."""
        return self.backend.info

    @property
    def system_fingerprint(self) -> str:
        """The backend's fingerprint (BackendInfo.system_fingerprint), and the adapter's files on a view."""
        base = self.info.system_fingerprint
        if self.adapter is None:
            return base
        stamp = self.adapters[self.adapter].stamp
        return "fp_" + hashlib.sha256(f"{base}\n{self.adapter}\n{stamp}".encode()).hexdigest()[:12]

    def cache_bytes(self) -> CacheBytes:
        return self.backend.cache_bytes()

    def speculated_tokens(self) -> tuple[int, int]:
        """(proposed, accepted) speculative tokens since load (see Backend.speculated_tokens)."""
        return self.backend.speculated_tokens()

    def limit_cache(self, budget: Callable[[], int | None]) -> None:
        """Keep the KV and prefix caches within `budget()` bytes (asked as they grow)."""
        self.backend.limit_cache(budget)

    def resident_bytes(self) -> int:
        """What the model holds now: its weights, loaded adapters, KV cache and cached prefixes."""
        caches = self.cache_bytes()
        adapters = sum(a.nbytes for a in list(self.adapters.values()))
        return self.info.memory_bytes + adapters + caches.kv_cache + caches.prefix_cache

    @property
    def context_length(self) -> int:
        return self.backend.info.context_length

    def params(self, **overrides) -> SamplingParams:
        """SamplingParams from the model's defaults, then the request's explicit values."""
        values = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return SamplingParams(**values)

    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        if not prompt_ids or len(prompt_ids) + max_tokens > self.context_length:
            raise ContextLengthError(len(prompt_ids), max_tokens, self.context_length)

    def grammar(self) -> GrammarCompiler:
        """This model's grammar compiler (built on first use). Raises GrammarError when the
        model cannot be constrained (a tokenizer without tokenizer.json)."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarCompiler(self.tokenizer, self.backend.info.vocab_size)
            return self._grammar

    def matcher(self, params: SamplingParams) -> TokenMatcher | None:
        """A new matcher for `params.constraint` (None without one). Raises GrammarError."""
        return None if params.constraint is None else self.grammar().matcher(params.constraint)

    def _start(self, prompt_ids: list[int], params: SamplingParams) -> StepChannel:
        self.check_length(prompt_ids, params.max_tokens)
        if self.adapter is not None:
            self.adapters[self.adapter].last_used = time.monotonic()
            return self.backend.submit(list(prompt_ids), params, self.tokenizer.eos_ids, self.matcher(params),
                                       adapter=self.adapter)
        return self.backend.submit(list(prompt_ids), params, self.tokenizer.eos_ids, self.matcher(params))

    def _text(self, prompt_ids: list[int], params: SamplingParams, channel: StepChannel, reply: bool) -> "_TextAssembler":
        """The state machine shared by the sync and async streams."""
        return _TextAssembler(self.tokenizer, params, prompt_ids, channel, reply, self.watch(len(prompt_ids)))

    def stream(self, prompt_ids: list[int], params: SamplingParams, reply: bool = False) -> Iterator[Chunk]:
        """Generate, yielding text as it becomes final. Closing the iterator cancels.

        Text continues the prompt exactly (" Paris" after "The capital is"); a chat
        `reply` starts at its first non-space character instead."""
        channel = self._start(prompt_ids, params)
        text = self._text(prompt_ids, params, channel, reply)
        try:
            for step in channel:
                chunk = text.step(step)
                if chunk is not None:
                    yield chunk
                if text.done:
                    return
            yield text.finish(channel.finished)
        finally:
            channel.cancel()
            text.watch.end(channel.cached_tokens)

    async def astream(self, prompt_ids: list[int], params: SamplingParams, reply: bool = False) -> AsyncIterator[Chunk]:
        """The asyncio twin of `stream`; `aclose()` (a client gone) cancels within one step."""
        channel = self._start(prompt_ids, params)
        text = self._text(prompt_ids, params, channel, reply)
        try:
            async for step in channel:
                chunk = text.step(step)
                if chunk is not None:
                    yield chunk
                if text.done:
                    return
            yield text.finish(channel.finished)
        finally:
            channel.cancel()
            text.watch.end(channel.cached_tokens)

    def generate(self, prompt_ids: list[int], params: SamplingParams, reply: bool = False) -> Completion:
        return _collect(list(self.stream(prompt_ids, params, reply)))

    async def agenerate(self, prompt_ids: list[int], params: SamplingParams, reply: bool = False) -> Completion:
        return _collect([chunk async for chunk in self.astream(prompt_ids, params, reply)])

    def complete(self, prompt: str, **params) -> str:
        """The small public API: text in, text out."""
        return self.generate(self.tokenizer.encode(prompt), self.params(**params)).text

    def chat(self, messages: list[dict], **params) -> str:
        return self.generate(self.tokenizer.encode_chat(messages), self.params(**params), reply=True).text

    def score(self, token_ids: list[int], top_n: int = 0) -> list[TokenLogprob]:
        """Log-probabilities of the prompt's own tokens (for `echo` and log-likelihood evals)."""
        if len(token_ids) > self.context_length:
            raise ContextLengthError(len(token_ids), 0, self.context_length)
        if self.adapter is not None:
            return self.backend.score(list(token_ids), top_n, adapter=self.adapter)
        return self.backend.score(list(token_ids), top_n)

    def close(self) -> None:
        self.backend.close()


class _TextAssembler:
    """Turns backend steps into text chunks: detokenize, cut at stop strings, count."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_ids: list[int], channel: StepChannel, reply: bool,
                 watch: GenerationWatch):
        self.channel = channel
        self.watch = watch
        self.detok = tokenizer.detokenizer(context=prompt_ids)
        self.stops = StopMatcher(params.stop)
        self.prompt_tokens = len(prompt_ids)
        self.leading_space = reply  # still to strip from a chat reply's start
        self.completion_tokens = 0
        self.done = False
        self.eos_ids = tokenizer.eos_ids

    def _usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.channel.cached_tokens)

    def _strip(self, text: str) -> str:
        if self.leading_space and text:
            text = text.lstrip()
            self.leading_space = not text
        return text

    def step(self, step: Step) -> Chunk | None:
        self.completion_tokens += 1
        self.watch.token()
        logprobs = [step.logprob] if step.logprob is not None else []
        if step.token_id in self.eos_ids:
            return None  # the EOS token itself is counted, never shown; Finished follows
        emitted, hit = self.stops.feed(self._strip(self.detok.add(step.token_id)))
        if hit:
            self.done = True
            return Chunk(emitted, [step.token_id], logprobs, "stop", self._usage(), self.stops.matched)
        return Chunk(emitted, [step.token_id], logprobs)

    def finish(self, finished: Finished | None) -> Chunk:
        if finished is not None and finished.reason == "error":
            raise RuntimeError(finished.error or "generation failed")
        if finished is not None and finished.reason == "memory":
            raise MemoryBudgetError(finished.error)
        tail, hit = self.stops.feed(self._strip(self.detok.flush()))
        tail = tail if hit else tail + self.stops.flush()
        reason = "length" if finished is not None and finished.reason == "length" and not hit else "stop"
        return Chunk(tail, [], [], reason, self._usage(), self.stops.matched)


def _collect(chunks: list[Chunk]) -> Completion:
    last = chunks[-1]
    return Completion(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        logprobs=[lp for c in chunks for lp in c.logprobs],
        finish_reason=last.finish_reason or "stop",
        usage=last.usage or Usage(0, 0),
        stop_sequence=last.stop_sequence,
    )
