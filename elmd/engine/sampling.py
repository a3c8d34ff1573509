"""Choosing the next token from logits, per sequence (PyTorch backend).

Each sequence owns a `Sampler` with its parameters, its own seeded generator and its
token counts, so sequences that share a batch never influence each other: a seeded
request gives the same tokens alone or beside others. A constrained sequence's sampler
also holds its grammar matcher: tokens the grammar forbids get no probability. The rules
(what each parameter means, in which order) are elmd/engine/sampling_rules.py's; this
file does each step with torch.
"""

from __future__ import annotations

import torch

from elmd.engine import sampling_rules
from elmd.engine.grammar import TokenMatcher
from elmd.engine.protocol import SamplingParams, TokenLogprob


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device="cpu",
                 matcher: TokenMatcher | None = None):
        self.params = params
        self.matcher = matcher
        self.bias = logit_bias(params, vocab_size, device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(sampling_rules.seed_of(params))
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

    # ---- sampling_rules.LogitsOps ---------------------------------------------------

    def repetition(self, logits: torch.Tensor, penalty: float) -> torch.Tensor:
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(self.seen, scaled, logits)

    def presence_frequency(self, logits: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
        return logits - frequency * self.counts - presence * (self.counts > 0).float()

    def add_bias(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias

    def forbid(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = torch.from_numpy(self.matcher.allowed()).to(logits.device, non_blocking=True)
        return logits.masked_fill(~allowed, float("-inf"))

    # ---- sampling_rules.SamplerOps --------------------------------------------------

    def argmax(self, logits: torch.Tensor) -> int:
        return int(torch.argmax(logits))

    def temperature(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        # A legal but extreme temperature or repetition penalty (1e-320, 1e-300) overflows
        # float32 logits to inf, and inf - inf is NaN in softmax: cap at the largest finite value.
        return (logits / temperature).nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)

    def top_k(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        kth = torch.topk(logits, k).values[-1]
        return logits.masked_fill(logits < kth, float("-inf"))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def min_p(self, probs: torch.Tensor, min_p: float) -> torch.Tensor:
        return probs.masked_fill(probs < min_p * probs.max(), 0.0)

    def top_p(self, probs: torch.Tensor, top_p: float) -> torch.Tensor:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        return probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    # ---- the scheduler's side -------------------------------------------------------

    def choose(self, logits: torch.Tensor) -> int:
        logits = sampling_rules.adjust(self, logits, self.params, constrained=self.matcher is not None)
        return sampling_rules.choose(self, logits, self.params)

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
