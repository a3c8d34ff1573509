"""The MLX backend: mlx-lm's OpenELM and its continuous batching (`BatchGenerator`).

mlx-lm does the modelling, the batched KV cache and the join/leave bookkeeping; this
file adapts it to the backend contract. One worker thread owns the model (MLX state is
per thread): between decode steps it admits new requests, drops cancelled ones and
answers `score()`. A finished request's keys and values go to a prefix cache (bounded in
bytes, as the PyTorch backend's); a prompt that starts with them is inserted with a copy
cut to the shared prefix, so only the rest is prefilled.

Each request brings its own sampler and seeded key (split once per step), so a seeded
request draws the same tokens alone or beside others. Penalties are applied to the raw
logits, like the PyTorch backend; reported log-probabilities are the model's, before
penalties and temperature.
"""

from __future__ import annotations

import copy
import json
import queue
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p
from mlx_lm.utils import load_model

from elmd.engine.grammar import TokenMatcher
from elmd.engine.prefix_cache import PrefixCache
from elmd.engine.protocol import BackendInfo, CacheBytes, Finished, SamplingParams, Step, StepChannel, TokenLogprob
from elmd.quant import INT4_GROUP, Quant

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
GROUP_SIZE = INT4_GROUP["mlx"]  # a bare int4's group here (elmd.quant says why), and int8's


@dataclass(frozen=True)
class MLXQuant:
    """mlx-lm affine quantization: `bits` for the transformer's linear layers,
    `embedding_bits` for the tied embedding/output head (None: left in float)."""

    bits: int
    group_size: int = GROUP_SIZE
    embedding_bits: int | None = 8


def parse_quant(quant: str | Quant) -> MLXQuant | None:
    """A quantization (a name is parsed by Quant.parse: bare "int4" is group 64 here) -> mlx-lm's
    layout; "none" -> None. bf16 has no scheme here: MLX runs bf16 weights as --dtype bfloat16
    (the load plan says so)."""
    quant = Quant.parse(quant, "mlx")
    if quant.scheme not in ("none", "int8", "int4"):
        raise ValueError(f"quantization {quant} has no MLX scheme; choose none, int8 or int4 (int4-g32, -g64, -g128)")
    if quant.scheme == "none":
        return None
    return MLXQuant(8, GROUP_SIZE) if quant.scheme == "int8" else MLXQuant(4, quant.group)


class _QuantizedLinear(nn.QuantizedLinear):
    """Multiplies in fp32 and returns the activations' dtype. MLX's CPU kernel accumulates
    a bf16 quantized matmul in bf16: measured 12% relative error at 12,288 inputs (the 3B's
    widest FFN) and 8x slower than fp32, which is exact."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x.astype(mx.float32)).astype(x.dtype)


class _QuantizedEmbedding(nn.QuantizedEmbedding):
    """The tied output head, multiplied in fp32 like `_QuantizedLinear`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return super().as_linear(x.astype(mx.float32)).astype(x.dtype)


def quantize(model: nn.Module, spec: MLXQuant, fp32_accumulate: bool) -> None:
    """Quantize in place with mlx-lm's affine scheme. The model must already hold bf16 (or
    fp32) weights: the scales take their dtype, and with it the quantized matmuls' inputs
    (fp16 overflows on the 3B, whose 4/8-bit MLX conversions then emit only <unk>)."""
    linear, embedding = (_QuantizedLinear, _QuantizedEmbedding) if fp32_accumulate else (nn.QuantizedLinear, nn.QuantizedEmbedding)

    def quantized(path: str, module: nn.Module):
        if isinstance(module, nn.Linear) and module.weight.shape[-1] % spec.group_size == 0:
            return linear.from_linear(module, spec.group_size, spec.bits)
        if isinstance(module, nn.Embedding) and spec.embedding_bits and module.weight.shape[-1] % spec.group_size == 0:
            return embedding.from_embedding(module, spec.group_size, spec.embedding_bits)
        return module

    leaves = tree_map_with_path(quantized, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)


def load_mlx_model(model_dir: str | Path, dtype: str = "auto", quant: str | Quant | MLXQuant | None = "none") -> nn.Module:
    """mlx-lm's OpenELM with our dtype (bf16 by default: the 3B overflows fp16) and
    quantization (a name or Quant, or parsed already). Call it on the thread that will run the model."""
    spec = quant if quant is None or isinstance(quant, MLXQuant) else parse_quant(quant)
    model, _ = load_model(Path(model_dir))
    target = mx.bfloat16 if dtype == "auto" else DTYPES[dtype]
    if spec is not None and target == mx.float16:
        raise ValueError("quantized MLX models run in bfloat16 or float32: float16 overflows on OpenELM-3B")
    model.set_dtype(target)
    if spec is not None:
        quantize(model, spec, fp32_accumulate=mx.default_device() == mx.cpu)
    mx.eval(model.parameters())
    return model


@dataclass
class _Request:
    channel: StepChannel
    params: SamplingParams
    prompt_ids: list[int]
    stop_ids: frozenset[int]
    matcher: TokenMatcher | None = None
    raw_logits: deque = field(default_factory=deque)  # penalized requests with logprobs: the unpenalized logits, oldest first
    generated: list[int] = field(default_factory=list)


def _top_logprob(logprobs: mx.array, token: int, top_n: int) -> TokenLogprob:
    """The chosen token's log-probability and the `top_n` best alternatives of a [V] row."""
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        ids = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
        ids = ids[mx.argsort(-logprobs[ids])]
        top = tuple(zip(ids.tolist(), logprobs[ids].tolist()))
    return TokenLogprob(token, logprobs[token].item(), top)


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """Temperature, top-k, min-p and top-p over one sequence's [1, V] log-probabilities,
    drawn with the request's own key (split once per call), never the global RNG."""
    if params.greedy:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    seed = params.seed if params.seed is not None else secrets.randbits(64)
    key = mx.random.key(seed % 2**64)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, draw = mx.random.split(key)
        scores = logprobs.astype(mx.float32) * (1.0 / params.temperature)
        if 0 < params.top_k < scores.shape[-1]:
            scores = apply_top_k(scores, params.top_k)
        if params.min_p > 0.0:
            scores = apply_min_p(scores, params.min_p)
        if params.top_p < 1.0:
            scores = apply_top_p(scores, params.top_p)
        return mx.random.categorical(scores, key=draw)

    return sample


def make_penalties(request: _Request, vocab_size: int) -> Callable[[mx.array, mx.array], mx.array] | None:
    """A logits processor for the PyTorch backend's penalties, over the whole context
    (mlx-lm's own processors look at the last 20 tokens only): repetition (CTRL-style) over
    prompt and output, presence and frequency (OpenAI-style) over the output."""
    p = request.params
    if not p.penalized:
        return None
    prompt_length = len(request.prompt_ids)
    keep_raw = p.logprobs is not None

    def penalize(context: mx.array, logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if keep_raw:
            request.raw_logits.append(logits[0])
        if p.repetition_penalty != 1.0:
            seen = mx.zeros((vocab_size,), dtype=mx.float32).at[context].add(1.0) > 0
            scaled = mx.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = mx.where(seen, scaled, logits)
        output = context[prompt_length:]
        if output.size and (p.presence_penalty or p.frequency_penalty):
            counts = mx.zeros((vocab_size,), dtype=mx.float32).at[output].add(1.0)
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        return logits

    return penalize


def make_constraint(request: _Request, vocab_size: int) -> Callable[[mx.array, mx.array], mx.array] | None:
    """A logits processor for `logit_bias` and the grammar: the matcher is told the tokens
    generated since its last call (mlx-lm passes the whole context), then forbidden tokens
    get -inf."""
    p = request.params
    if not p.logit_bias and request.matcher is None:
        return None
    bias = None
    if p.logit_bias:
        ids, values = zip(*p.logit_bias)
        bias = mx.zeros((vocab_size,), dtype=mx.float32).at[mx.array(ids)].add(mx.array(values, dtype=mx.float32))
    seen = len(request.prompt_ids)

    def constrain(context: mx.array, logits: mx.array) -> mx.array:
        nonlocal seen
        logits = logits.astype(mx.float32)
        if bias is not None:
            logits = logits + bias
        if request.matcher is not None:
            for token in context[seen:].tolist():
                request.matcher.consume(token)
            seen = context.size
            logits = mx.where(mx.array(request.matcher.allowed()), logits, -mx.inf)
        return logits

    return constrain


def _cache_bytes(cache: list) -> int:
    return sum(layer.nbytes for layer in cache)


class MLXBackend:
    def __init__(self, model_dir: str | Path, dtype: str = "auto", quant: str | Quant = "none", max_batch: int = 32,
                 prefix_cache_bytes: int = 256 << 20):
        """`prefix_cache_bytes`: keys and values of finished requests kept for prompts that
        start with them (a chat's next turn), as the PyTorch backend keeps them; 0: off."""
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        quant = Quant.parse(quant, "mlx")  # an unknown name is refused here, before the worker starts
        spec = parse_quant(quant)
        self._max_batch = max_batch
        self._prefix = PrefixCache(prefix_cache_bytes, size=_cache_bytes)
        self._kv_bytes = 0  # the KV cache's size after the last step, kept by the worker
        self._cache_budget: Callable[[], int | None] = lambda: None
        self._vocab_size = config["vocab_size"]
        self._jobs: queue.SimpleQueue[_Request | Callable[[], None] | None] = queue.SimpleQueue()
        loaded: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, args=(model_dir, dtype, spec, loaded), name="elmd-mlx", daemon=True)
        self._thread.start()
        error = loaded.get()
        if error is not None:
            raise error
        self.info = BackendInfo(
            name="mlx",
            device="mlx-" + ("gpu" if mx.default_device() == mx.gpu else "cpu"),
            dtype=str(self.model.transformer.norm.weight.dtype).removeprefix("mlx.core."),
            quant=str(quant),
            context_length=min(config.get("max_context_length", 2048), config.get("rope_max_length", 4096)),
            vocab_size=self._vocab_size,
            memory_bytes=sum(v.nbytes for _, v in nn.utils.tree_flatten(self.model.parameters())),
            extra={"max_batch": max_batch, "prefix_cache_bytes": prefix_cache_bytes},
        )

    # ---- the worker thread ----------------------------------------------------------

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            completion_batch_size=self._max_batch,
            prefill_batch_size=min(8, self._max_batch),
            stream=mx.new_stream(mx.default_device()),
        )

    def _work(self, model_dir: Path, dtype: str, spec: MLXQuant | None, loaded: queue.SimpleQueue) -> None:
        try:
            self.model = load_mlx_model(model_dir, dtype, spec)
            self._generator = self._new_generator()
        except Exception as e:
            loaded.put(e)
            return
        loaded.put(None)
        running: dict[int, _Request] = {}
        while True:
            jobs = [self._jobs.get()] if not running else []
            while True:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if None in jobs:
                waiting = [job for job in jobs if isinstance(job, _Request)]
                for request in [*running.values(), *waiting]:
                    request.channel.close(Finished("cancelled"))
                self._generator.close()
                return
            for job in jobs:
                if isinstance(job, _Request):
                    self._admit(running, job)
                else:
                    job()
            cancelled = [uid for uid, request in running.items() if request.channel.cancelled]
            if cancelled:
                self._generator.remove(cancelled)
                for uid in cancelled:
                    running.pop(uid).channel.close(Finished("cancelled"))
            if running:
                self._step(running)
            self._kv_bytes = self._generator.prompt_cache_nbytes if running else 0
            budget = self._cache_budget()
            if budget is not None:  # cached prefixes take what the running requests leave
                self._prefix.shrink(budget - self._kv_bytes)

    def _step(self, running: dict[int, _Request]) -> None:
        """One decode step for the batch (and at most one prefill chunk for newcomers)."""
        try:
            _, responses = self._generator.next()
            for response in responses:
                self._deliver(running, response)
        except Exception as e:
            error = Finished("error", error=f"{type(e).__name__}: {e}")
            for request in running.values():
                request.channel.close(error)
            running.clear()
            self._generator.close()
            self._generator = self._new_generator()

    def _admit(self, running: dict[int, _Request], request: _Request) -> None:
        if request.channel.cancelled:
            request.channel.close(Finished("cancelled"))
            return
        if request.params.max_tokens <= 0:
            request.channel.close(Finished("length"))
            return
        budget = self._cache_budget()
        if budget is not None and self._kv_bytes > budget:  # mlx-lm grows its caches itself: refuse newcomers
            request.channel.close(Finished("memory", error=f"The KV cache already takes {self._kv_bytes >> 20} MiB, more "
                                           f"than the {max(budget, 0) >> 20} MiB the memory budget leaves this model."))
            return
        processors = [make_penalties(request, self._vocab_size), make_constraint(request, self._vocab_size)]
        stops = [] if request.params.ignore_eos and request.matcher is None else [[token] for token in sorted(request.stop_ids)]
        reused, cache = self._prefix.lookup(request.prompt_ids)
        if cache is not None:  # a copy, cut to the shared prefix; the stored entry stays whole
            cache = copy.deepcopy(cache)
            trim_prompt_cache(cache, cache[0].offset - reused)
            request.channel.cached_tokens = reused
        (uid,) = self._generator.insert(
            [request.prompt_ids[reused:]],
            caches=[cache],
            all_tokens=[request.prompt_ids[:reused]],  # what the logits processors see as the context's start
            max_tokens=[request.params.max_tokens],
            samplers=[make_sampler(request.params)],
            logits_processors=[[p for p in processors if p is not None]],
            stop_sequences=[StopSequences(stops)],
        )
        running[uid] = request

    def _deliver(self, running: dict[int, _Request], response) -> None:
        request = running[response.uid]
        top_n = request.params.logprobs
        logprob = None
        if request.raw_logits:
            raw = request.raw_logits.popleft()
            if top_n is not None:
                logprob = _top_logprob(_log_softmax(raw), response.token, top_n)
        elif top_n is not None:
            logprob = _top_logprob(response.logprobs, response.token, top_n)
        request.channel.put(Step(response.token, logprob))
        request.generated.append(response.token)
        if response.finish_reason is not None:
            del running[response.uid]
            if response.prompt_cache and self._prefix.max_bytes > 0:
                tokens = request.prompt_ids + request.generated
                self._prefix.store(tokens[: response.prompt_cache[0].offset], response.prompt_cache)
            request.channel.close(Finished("eos" if response.finish_reason == "stop" else "length"))

    # ---- the contract ---------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
               matcher: TokenMatcher | None = None) -> StepChannel:
        self._check_open()
        channel = StepChannel()  # prompt and max_tokens fit the context: Engine.check_length saw to it
        self._jobs.put(_Request(channel, params, list(prompt_ids), frozenset(stop_ids), matcher))
        return channel

    def score(self, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        if len(token_ids) < 2:
            return []
        return self._on_worker(lambda: self._score(token_ids, top_n))

    def cache_bytes(self) -> CacheBytes:
        # Sizes kept by the worker: never waits for a step (the memory budget of another
        # model's worker reads it).
        return CacheBytes(kv_cache=self._kv_bytes, prefix_cache=self._prefix.bytes)

    def speculated_tokens(self) -> tuple[int, int]:
        return 0, 0  # MLX does not speculate yet

    def limit_cache(self, budget: Callable[[], int | None]) -> None:
        """`budget()`: bytes the KV cache and cached prefixes may take now; prefixes are
        dropped first, and past it new requests are refused."""
        self._cache_budget = budget

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

    def _score(self, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        logprobs = _log_softmax(self.model(mx.array([token_ids]))[0, :-1])
        targets = mx.array(token_ids[1:])
        chosen = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0].tolist()
        tops: list[tuple] = [()] * len(chosen)
        if top_n > 0:
            ids = mx.argsort(-logprobs, axis=-1)[:, :top_n]
            values = mx.take_along_axis(logprobs, ids, axis=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids[1:], chosen, tops)]

    def _check_open(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the MLX backend is closed")

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self.model = None
