"""How a sequence's next token is chosen: the rules both backends follow, stated once.

From the model's logits for one sequence, in this order:

1. penalties on the raw logits, when set: repetition (CTRL-style: a positive logit of a
   token seen in the prompt or the output is divided by the penalty, a negative one
   multiplied; 1.0 is off), then frequency (times the token's count) and presence (once)
   subtracted, counting the output only (OpenAI-style; 0 is off);
2. `logit_bias` added ((token id, value) pairs);
3. tokens the grammar forbids set to -inf;
4. greedy (temperature 0, or top_k 1): the highest, nothing else;
5. otherwise the temperature, then top-k (0 or the vocabulary's size and above: off),
   min-p (0: off) and top-p (1: off), then a draw with the sequence's own generator:
   seeded by the request's seed modulo 2**64 (a random one without), so a seeded request
   draws the same tokens alone or beside others.

Reported log-probabilities are the model's, before all of this. Ranges are checked where
requests arrive (the API's schemas, models.yaml); these rules assume valid parameters.

`adjust` (1-3) and `choose` (4-5) apply the rules through a backend's `LogitsOps` and
`SamplerOps`, which do each step with its own array library (elmd/engine/sampling.py for
PyTorch, elmd/engine/mlx_sampling.py for MLX).
"""

from __future__ import annotations

import secrets
from typing import Protocol, TypeVar

from elmd.engine.protocol import SamplingParams

A = TypeVar("A")


class LogitsOps(Protocol[A]):
    """Steps 1-3 for one sequence, on fp32 logits; each is called only when its parameter is on."""

    def repetition(self, logits: A, penalty: float) -> A: ...

    def presence_frequency(self, logits: A, presence: float, frequency: float) -> A: ...

    def add_bias(self, logits: A) -> A: ...

    def forbid(self, logits: A) -> A: ...


class SamplerOps(Protocol[A]):
    """Steps 4-5 for one sequence. `distribution` turns the cut scores into what min-p,
    top-p and the draw take (probabilities or log-probabilities, as the backend likes)."""

    def argmax(self, scores: A): ...

    def temperature(self, scores: A, temperature: float) -> A: ...

    def top_k(self, scores: A, k: int) -> A: ...

    def distribution(self, scores: A) -> A: ...

    def min_p(self, scores: A, min_p: float) -> A: ...

    def top_p(self, scores: A, top_p: float) -> A: ...

    def draw(self, scores: A): ...


def adjust(ops: LogitsOps[A], logits: A, params: SamplingParams, constrained: bool) -> A:
    """Steps 1-3: penalties, `logit_bias`, then the grammar's mask (when `constrained`)."""
    if params.repetition_penalty != 1.0:
        logits = ops.repetition(logits, params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        logits = ops.presence_frequency(logits, params.presence_penalty, params.frequency_penalty)
    if params.logit_bias:
        logits = ops.add_bias(logits)
    if constrained:
        logits = ops.forbid(logits)
    return logits


def choose(ops: SamplerOps[A], scores: A, params: SamplingParams):
    """Steps 4-5: the token (as the backend returns it) from adjusted scores [..., V]."""
    if params.greedy:
        return ops.argmax(scores)
    scores = ops.temperature(scores, params.temperature)
    if 0 < params.top_k < scores.shape[-1]:
        scores = ops.top_k(scores, params.top_k)
    scores = ops.distribution(scores)
    if params.min_p > 0.0:
        scores = ops.min_p(scores, params.min_p)
    if params.top_p < 1.0:
        scores = ops.top_p(scores, params.top_p)
    return ops.draw(scores)


def seed_of(params: SamplingParams) -> int:
    """The 64-bit seed of the sequence's generator: the request's, or a random one."""
    return params.seed % 2**64 if params.seed is not None else secrets.randbits(64)
