"""Choosing the next token from logits, per sequence (PyTorch backend).

Each sequence owns a `Sampler` with its parameters, its own seeded generator and its
token counts, so sequences that share a batch never influence each other: a seeded
request gives the same tokens alone or beside others. A constrained sequence's sampler
also holds its grammar matcher: tokens the grammar forbids get no probability.
"""

from __future__ import annotations

import torch

from elmd.engine.grammar import TokenMatcher
from elmd.engine.protocol import SamplingParams, TokenLogprob


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device="cpu",
                 matcher: TokenMatcher | None = None):
        self.params = params
        self.matcher = matcher
        self.bias = logit_bias(params, vocab_size, device)
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        # Token bookkeeping only where a penalty reads it: each write is a device op per
        # token (two kernel launches on a GPU, ~20 us of the scheduler's host time here).
        if params.penalized:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # prompt + output, for repetition
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # output only, for presence/frequency
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, device=device).clamp_(0, vocab_size - 1)] = True

    def observe(self, token_id: int) -> None:
        if self.params.penalized:
            self.seen[token_id] = True
            self.counts[token_id] += 1

    def apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        """Repetition (CTRL-style, over prompt and output), presence and frequency (OpenAI-style,
        over the output) penalties."""
        p = self.params
        if p.repetition_penalty != 1.0:
            scaled = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, scaled, logits)
        if p.presence_penalty or p.frequency_penalty:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = self.apply_penalties(logits)
        if self.bias is not None:
            logits = logits + self.bias
        if self.matcher is not None:
            allowed = torch.from_numpy(self.matcher.allowed()).to(logits.device, non_blocking=True)
            logits = logits.masked_fill(~allowed, float("-inf"))
        if p.greedy:
            return int(torch.argmax(logits))
        # A legal but extreme temperature or repetition penalty (1e-320, 1e-300) overflows
        # float32 logits to inf, and inf - inf is NaN in softmax: cap at the largest finite value.
        logits = (logits / p.temperature).nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = sorted_probs.cumsum(-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """Pick a token from fp32 logits [V]; report its log-probability under the model
        (before penalties and temperature) when asked."""
        token = self.choose(logits)
        self.observe(token)
        if self.matcher is not None:
            self.matcher.consume(token)
        if self.params.logprobs is None:
            return token, None
        return token, logprob_of(torch.log_softmax(logits, dim=-1), token, self.params.logprobs)


def logit_bias(params: SamplingParams, vocab_size: int, device="cpu") -> torch.Tensor | None:
    """OpenAI's logit_bias as a dense [V] tensor added to the logits (None without one)."""
    if not params.logit_bias:
        return None
    ids, values = zip(*params.logit_bias)
    bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    bias[torch.tensor(ids, device=device)] = torch.tensor(values, dtype=torch.float32, device=device)
    return bias


def logprob_of(logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        values, ids = torch.topk(logprobs, top_n)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)
