"""Choosing the next token with MLX, per request: the hooks mlx-lm's `BatchGenerator` calls.

The rules (what each parameter means, in which order) are elmd/engine/sampling_rules.py's;
this file does each step with mlx. `RequestLogits` is a request's logits processor (steps
1-3, over the whole context: mlx-lm's own penalty processors look at the last 20 tokens
only); `Sampler` draws from the log-probabilities mlx-lm computes after it (steps 4-5)
with the request's own key, split once per call, never the global RNG.
"""

from __future__ import annotations

from collections import deque

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from elmd.engine import sampling_rules
from elmd.engine.grammar import TokenMatcher
from elmd.engine.protocol import SamplingParams, TokenLogprob


class RequestLogits:
    """Penalties, `logit_bias` and the grammar over one request's [1, V] logits. mlx-lm
    passes the whole context (prompt and output so far); the grammar's matcher is told the
    tokens generated since the last call. A penalized request that asks for log-probabilities
    gets each step's logits before penalties appended to `raw_logits`."""

    def __init__(self, params: SamplingParams, prompt_length: int, vocab_size: int, matcher: TokenMatcher | None,
                 raw_logits: deque):
        self.params, self.prompt_length, self.vocab_size, self.matcher = params, prompt_length, vocab_size, matcher
        self.raw_logits = raw_logits if params.penalized and params.logprobs is not None else None
        self.bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self.bias = mx.zeros((vocab_size,), dtype=mx.float32).at[mx.array(ids)].add(mx.array(values, dtype=mx.float32))
        self.matched = prompt_length  # context tokens the matcher has been told
        self.context: mx.array | None = None  # the one being processed

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if self.raw_logits is not None:
            self.raw_logits.append(logits[0])
        self.context = context
        return sampling_rules.adjust(self, logits, self.params, constrained=self.matcher is not None)

    # ---- sampling_rules.LogitsOps ---------------------------------------------------

    def repetition(self, logits: mx.array, penalty: float) -> mx.array:
        seen = mx.zeros((self.vocab_size,), dtype=mx.float32).at[self.context].add(1.0) > 0
        scaled = mx.where(logits > 0, logits / penalty, logits * penalty)
        return mx.where(seen, scaled, logits)

    def presence_frequency(self, logits: mx.array, presence: float, frequency: float) -> mx.array:
        output = self.context[self.prompt_length:]
        if not output.size:
            return logits
        counts = mx.zeros((self.vocab_size,), dtype=mx.float32).at[output].add(1.0)
        return logits - frequency * counts - presence * (counts > 0)

    def add_bias(self, logits: mx.array) -> mx.array:
        return logits + self.bias

    def forbid(self, logits: mx.array) -> mx.array:
        for token in self.context[self.matched:].tolist():
            self.matcher.consume(token)
        self.matched = self.context.size
        return mx.where(mx.array(self.matcher.allowed()), logits, -mx.inf)


def logits_processors(params: SamplingParams, prompt_length: int, vocab_size: int, matcher: TokenMatcher | None,
                      raw_logits: deque) -> list[RequestLogits]:
    """A request's processors for mlx-lm: none when it has nothing to adjust."""
    if not (params.penalized or params.logit_bias or matcher is not None):
        return []
    return [RequestLogits(params, prompt_length, vocab_size, matcher, raw_logits)]


class Sampler:
    """A request's sampler: [1, V] log-probabilities in, the chosen token [1] out."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.key = mx.random.key(sampling_rules.seed_of(params))

    def __call__(self, logprobs: mx.array) -> mx.array:
        return sampling_rules.choose(self, logprobs, self.params)

    # ---- sampling_rules.SamplerOps --------------------------------------------------

    def argmax(self, logprobs: mx.array) -> mx.array:
        return mx.argmax(logprobs, axis=-1)

    def temperature(self, logprobs: mx.array, temperature: float) -> mx.array:
        return logprobs.astype(mx.float32) * (1.0 / temperature)

    def top_k(self, scores: mx.array, k: int) -> mx.array:
        return apply_top_k(scores, k)

    def distribution(self, scores: mx.array) -> mx.array:
        return scores  # mlx-lm's min-p, top-p and categorical take log-probabilities

    def min_p(self, scores: mx.array, min_p: float) -> mx.array:
        return apply_min_p(scores, min_p)

    def top_p(self, scores: mx.array, top_p: float) -> mx.array:
        return apply_top_p(scores, top_p)

    def draw(self, scores: mx.array) -> mx.array:
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(scores, key=draw)


def top_logprob(logprobs: mx.array, token: int, top_n: int) -> TokenLogprob:
    """The chosen token's log-probability and the `top_n` best alternatives of a [V] row."""
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        ids = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
        ids = ids[mx.argsort(-logprobs[ids])]
        top = tuple(zip(ids.tolist(), logprobs[ids].tolist()))
    return TokenLogprob(token, logprobs[token].item(), top)


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
