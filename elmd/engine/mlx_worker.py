"""The MLX backend's worker thread: continuous batching on mlx-lm's `BatchGenerator`.

One thread owns the model (MLX state is per thread): between decode steps it admits new
requests, drops cancelled ones and runs other work (`score()`, adapter loads). A finished
request's keys and values go to a prefix cache (bounded in bytes, as the PyTorch backend's);
a prompt that starts with them is inserted with a copy cut to the shared prefix, so only the
rest is prefilled. Reported log-probabilities are the model's, before penalties and temperature.

LoRA adapters are served as mlx-lm applies them, to a whole forward: each adapted model is a
`Variant` with its own generator, so requests for one adapter are batched together and never
with the base's or another adapter's; every variant with work advances one step per round.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import trim_prompt_cache

from elmd.engine.grammar import TokenMatcher
from elmd.engine.mlx_sampling import Sampler, log_softmax, logits_processors, top_logprob
from elmd.engine.prefix_cache import PrefixCache
from elmd.engine.protocol import Finished, SamplingParams, Step, StepChannel, TokenLogprob


@dataclass
class Request:
    channel: StepChannel
    params: SamplingParams
    prompt_ids: list[int]
    stop_ids: frozenset[int]
    matcher: TokenMatcher | None = None
    adapter: int = 0  # the LoRA adapter's space (0: the base): which Variant runs it, and its prefix-cache space
    raw_logits: deque = field(default_factory=deque)  # penalized requests with logprobs: the unpenalized logits, oldest first
    generated: list[int] = field(default_factory=list)


@dataclass
class Variant:
    """A model the worker serves, with its own continuous batch: the base or the base under one adapter."""

    model: nn.Module
    generator: BatchGenerator
    running: dict[int, Request] = field(default_factory=dict)  # by the generator's uid


class BatchWorker:
    """The worker's side of `MLXBackend`, which sets these up and runs `_serve()` on the
    worker thread once the model is loaded."""

    model: nn.Module  # the base
    _variants: dict[int, Variant]  # by space: 0 the base, then one per loaded adapter (a space is never reused)
    _next_space: int
    _stream: mx.Stream  # every generator's: they are stepped one after another on this thread
    _jobs: queue.SimpleQueue  # Requests, work for `_on_worker`, and None to stop
    _max_batch: int
    _vocab_size: int
    _prefix: PrefixCache
    _kv_bytes: int  # the KV cache's size after the last step
    _cache_budget: Callable[[], int | None]
    _thread: threading.Thread  # the worker

    @property
    def _generator(self) -> BatchGenerator:
        """The base model's generator."""
        return self._variants[0].generator

    def _new_generator(self, model: nn.Module) -> BatchGenerator:
        return BatchGenerator(
            model,
            completion_batch_size=self._max_batch,
            prefill_batch_size=min(8, self._max_batch),
            stream=self._stream,
        )

    def _add_variant(self, model: nn.Module) -> int:
        """Serve `model` (the base under an adapter) beside the others; its space."""
        space, self._next_space = self._next_space, self._next_space + 1
        self._variants[space] = Variant(model, self._new_generator(model))
        return space

    def _remove_variant(self, space: int) -> bool:
        """Stop serving `space` and forget its cached prefixes, unless a request runs on it (False).
        Requests submitted earlier are admitted by now: jobs run in the order they came."""
        variant = self._variants[space]
        if variant.running:
            return False
        variant.generator.close()
        del self._variants[space]
        self._prefix.drop_space(space)
        return True

    def _serve(self) -> None:
        """Run jobs and decode steps until told to stop (a None job)."""
        while True:
            busy = any(variant.running for variant in self._variants.values())
            jobs = [self._jobs.get()] if not busy else []
            while True:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if None in jobs:
                waiting = [job for job in jobs if isinstance(job, Request)]
                for request in [*(r for v in self._variants.values() for r in v.running.values()), *waiting]:
                    request.channel.close(Finished("cancelled"))
                for variant in reversed(self._variants.values()):  # the base's last: it restores the wired limit it found
                    variant.generator.close()
                self._variants.clear()
                return
            for job in jobs:
                if isinstance(job, Request):
                    self._admit(job)
                else:
                    job()
            for variant in self._variants.values():
                cancelled = [uid for uid, request in variant.running.items() if request.channel.cancelled]
                if cancelled:
                    variant.generator.remove(cancelled)
                    for uid in cancelled:
                        variant.running.pop(uid).channel.close(Finished("cancelled"))
                if variant.running:
                    self._step(variant)
            self._kv_bytes = sum(v.generator.prompt_cache_nbytes for v in self._variants.values() if v.running)
            budget = self._cache_budget()
            if budget is not None:  # cached prefixes take what the running requests leave
                self._prefix.shrink(budget - self._kv_bytes)

    def _step(self, variant: Variant) -> None:
        """One decode step for the variant's batch (and at most one prefill chunk for newcomers)."""
        try:
            _, responses = variant.generator.next()
            for response in responses:
                self._deliver(variant, response)
        except Exception as e:
            error = Finished("error", error=f"{type(e).__name__}: {e}")
            for request in variant.running.values():
                request.channel.close(error)
            variant.running.clear()
            variant.generator.close()
            variant.generator = self._new_generator(variant.model)

    def _admit(self, request: Request) -> None:
        if request.channel.cancelled:
            request.channel.close(Finished("cancelled"))
            return
        if request.params.max_tokens <= 0:
            request.channel.close(Finished("length"))
            return
        variant = self._variants.get(request.adapter)
        if variant is None:  # unloaded between submit() and here
            request.channel.close(Finished("error", error="the LoRA adapter was unloaded"))
            return
        budget = self._cache_budget()
        if budget is not None and self._kv_bytes > budget:  # mlx-lm grows its caches itself: refuse newcomers
            request.channel.close(Finished("memory", error=f"The KV cache already takes {self._kv_bytes >> 20} MiB, more "
                                           f"than the {max(budget, 0) >> 20} MiB the memory budget leaves this model."))
            return
        processors = logits_processors(request.params, len(request.prompt_ids), self._vocab_size, request.matcher,
                                       request.raw_logits)
        stops = [] if request.params.ignore_eos and request.matcher is None else [[token] for token in sorted(request.stop_ids)]
        reused, cache = self._prefix.lookup(request.prompt_ids, request.adapter)
        if cache is not None:  # a copy, cut to the shared prefix; the stored entry stays whole
            cache = copy.deepcopy(cache)
            trim_prompt_cache(cache, cache[0].offset - reused)
            request.channel.cached_tokens = reused
        (uid,) = variant.generator.insert(
            [request.prompt_ids[reused:]],
            caches=[cache],
            all_tokens=[request.prompt_ids[:reused]],  # what the logits processors see as the context's start
            max_tokens=[request.params.max_tokens],
            samplers=[Sampler(request.params)],
            logits_processors=[processors],
            stop_sequences=[StopSequences(stops)],
        )
        variant.running[uid] = request

    def _deliver(self, variant: Variant, response) -> None:
        request = variant.running[response.uid]
        top_n = request.params.logprobs
        logprob = None
        if request.raw_logits:
            raw = request.raw_logits.popleft()
            if top_n is not None:
                logprob = top_logprob(log_softmax(raw), response.token, top_n)
        elif top_n is not None:
            logprob = top_logprob(response.logprobs, response.token, top_n)
        request.channel.put(Step(response.token, logprob))
        request.generated.append(response.token)
        if response.finish_reason is not None:
            del variant.running[response.uid]
            if response.prompt_cache and self._prefix.max_bytes > 0:
                tokens = request.prompt_ids + request.generated
                self._prefix.store(tokens[: response.prompt_cache[0].offset], response.prompt_cache, request.adapter)
            request.channel.close(Finished("eos" if response.finish_reason == "stop" else "length"))

    def _on_worker(self, work: Callable[[], object]):
        """Run `work` on the worker thread between two decode steps and return its result."""
        self._check_open()
        result: queue.SimpleQueue = queue.SimpleQueue()

        def job():
            try:
                result.put((True, work()))
            except Exception as e:
                result.put((False, e))

        self._jobs.put(job)
        ok, value = result.get()
        if not ok:
            raise value
        return value

    def _check_open(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the MLX backend is closed")

    def _score(self, model: nn.Module, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        logprobs = log_softmax(model(mx.array([token_ids]))[0, :-1])
        targets = mx.array(token_ids[1:])
        chosen = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0].tolist()
        tops: list[tuple] = [()] * len(chosen)
        if top_n > 0:
            ids = mx.argsort(-logprobs, axis=-1)[:, :top_n]
            values = mx.take_along_axis(logprobs, ids, axis=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids[1:], chosen, tops)]
