"""Speculation: guesses at a sequence's next tokens, which the scheduler verifies in one pass.
Prompt lookup copies them from the sequence's own tokens; a draft model guesses them.

Replies that quote, rewrite, extract from or fix their input repeat runs of it. When the
last few tokens occurred earlier (in the prompt or the reply so far), the tokens that
followed them there are a free guess at what comes next. The scheduler checks a guess in
one forward pass over [last token + guess], which at batch 1 costs much less than a pass
per token, and keeps only what the sequence's own sampler picks (Scheduler._accept), so
the output is exactly what plain decoding gives.
"""

from __future__ import annotations

import statistics

MAX_NGRAM = 3  # the longest run of last tokens looked up; shorter ones are tried after it
MAX_PROPOSAL = 8  # the most tokens one pass verifies
FIRST_PROPOSAL = 4  # a pass costs about the same for 3 to 9 tokens (ATen on a CPU: 2.0-2.2x a plain step)
PROBE_HITS = 2  # plain steps in a row whose guess would have been right before a pass is spent on one


class PromptLookup:
    """One sequence's n-gram index and the proposal length, which follows acceptance: it
    doubles after a guess is accepted whole, stays after a partial one, and drops to zero
    when none of a guess is accepted. At zero no pass is spent on guesses until they would
    have been right on PROBE_HITS plain steps in a row (checked for free against the token
    each step sampled): unrelated text, where a last token recurs but what follows it does
    not, keeps plain steps."""

    def __init__(self):
        # follows[n - 1][ngram]: where what followed the ngram's latest occurrence starts
        self.follows: list[dict[tuple[int, ...], int]] = [{} for _ in range(MAX_NGRAM)]
        self.indexed = 0  # n-grams ending before this index are in `follows`
        self.length = 0  # starts as after a miss: unrelated prompts never pay for a pass
        self.hits = 0  # plain steps in a row whose guess was right
        self.guess: list[int] = []  # the last lookup's match, at most MAX_PROPOSAL tokens
        self.acceptance = Acceptance()

    def propose(self, tokens: list[int], room: int) -> list[int]:
        """Tokens to verify after `tokens` (at most `room`); empty for a plain step."""
        self.guess = self._lookup(tokens)
        return self.guess[: min(self.length, room)]

    def record(self, proposal: list[int], accepted: int, sampled: int) -> None:
        """Adapt the length to a step's outcome: `accepted` of the `proposal`'s tokens
        were kept; without a proposal, the step sampled `sampled`."""
        self.acceptance.record(proposal, accepted)
        if proposal:
            if accepted == len(proposal):
                self.length = min(2 * self.length, MAX_PROPOSAL)
            elif accepted == 0:
                self.length = 0
        elif self.length == 0:
            self.hits = self.hits + 1 if self.guess and self.guess[0] == sampled else 0
            if self.hits >= PROBE_HITS:
                self.length, self.hits = FIRST_PROPOSAL, 0

    def _lookup(self, tokens: list[int]) -> list[int]:
        """What followed the latest earlier occurrence of the longest matching last n-gram."""
        self._index(tokens)
        for n in range(min(MAX_NGRAM, len(tokens) - 1), 0, -1):
            start = self.follows[n - 1].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + MAX_PROPOSAL]
        return []

    def _index(self, tokens: list[int]) -> None:
        """Add the n-grams that end at each token not yet indexed, except the last (which
        has nothing after it yet)."""
        for end in range(self.indexed, len(tokens) - 1):
            for n in range(1, min(MAX_NGRAM, end + 1) + 1):
                self.follows[n - 1][tuple(tokens[end - n + 1 : end + 1])] = end + 1
        self.indexed = max(self.indexed, len(tokens) - 1)


FIRST_DRAFT = 4  # draft tokens per pass to begin with
DRAFT_PROBE_STEPS = 16  # plain steps after a draft stopped paying before it is tried again
DRAFT_PREFILL_CHUNK = 256


class DraftModel:
    """A smaller model with the same tokenizer (models.yaml `draft`, `serve --draft`) that
    guesses a sequence's next tokens greedily. It keeps one row of keys and values, for the
    tokens in `cached`; a sequence's guess feeds it only what differs from them (the last
    kept token and the target's correction, or a whole new prompt), then one step per
    guessed token. Runs on the scheduler's thread."""

    def __init__(self, runner, device):
        self.runner, self.model, self.device = runner, runner.model, device
        self.model.setup_caches(1, self.model.cfg.context_length)
        self.cached: list[int] = []

    def guess(self, tokens: list[int], n: int) -> list[int]:
        import torch

        n = min(n, self.model.cfg.context_length - len(tokens))
        if n <= 0:
            return []
        keep = _common_prefix(self.cached, tokens[:-1])  # at least the last token is fed, for its logits
        slot = torch.tensor([0], device=self.device)
        logits = None
        for start in range(keep, len(tokens), DRAFT_PREFILL_CHUNK):
            end = min(start + DRAFT_PREFILL_CHUNK, len(tokens))
            chunk = torch.tensor([tokens[start:end]], device=self.device)
            logits = self.runner(chunk, torch.arange(start, end, device=self.device)[None], slot, span=end,
                                 last_only=True)
        guessed = [int(logits[0, -1].argmax())]
        for i in range(n - 1):
            position = len(tokens) + i
            step = torch.tensor([[guessed[-1]]], device=self.device)
            logits = self.runner(step, torch.tensor([[position]], device=self.device), slot, span=position + 1)
            guessed.append(int(logits[0, -1].argmax()))
        self.cached = tokens + guessed[:-1]
        return guessed

    def cache_bytes(self) -> int:
        return self.model.cache_bytes()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class DraftProposer:
    """One sequence's use of the draft model, with PromptLookup's interface. The guess
    length follows acceptance: doubled after a guess is kept whole, halved (to one) after
    one that is not. After two guesses in a row of which nothing was kept, the draft rests
    for DRAFT_PROBE_STEPS plain steps (its steps and the wider pass would cost more than
    they save), then it is tried again."""

    def __init__(self, draft: DraftModel):
        self.draft = draft
        self.length = FIRST_DRAFT
        self.misses = 0  # guesses in a row of which nothing was kept
        self.resting = 0  # plain steps left before the draft is tried again
        self.acceptance = Acceptance()

    def propose(self, tokens: list[int], room: int) -> list[int]:
        if self.resting or room <= 0:
            return []
        return self.draft.guess(tokens, min(self.length, room, MAX_PROPOSAL))

    def record(self, proposal: list[int], accepted: int, sampled: int) -> None:
        self.acceptance.record(proposal, accepted)
        if not proposal:
            self.resting = max(0, self.resting - 1)
            return
        if accepted == len(proposal):
            self.length, self.misses = min(2 * self.length, MAX_PROPOSAL), 0
        elif accepted:
            self.length, self.misses = max(1, self.length // 2), 0
        else:
            self.length, self.misses = max(1, self.length // 2), self.misses + 1
            if self.misses >= 2:
                self.resting, self.misses = DRAFT_PROBE_STEPS, 0


class Acceptance:
    """The chance that a sequence's next guessed token is kept, given the one before it was:
    each verified guess is a run of kept tokens ended by a miss (or by its end), so the
    estimate is kept / (kept + misses), starting from one of each (1/2)."""

    def __init__(self):
        self.kept, self.misses = 1, 1

    def record(self, proposal: list[int], accepted: int) -> None:
        if proposal:
            self.kept += accepted
            self.misses += accepted < len(proposal)

    @property
    def rate(self) -> float:
        return self.kept / (self.kept + self.misses)


class PassCosts:
    """What a decode pass costs by its number of rows, as measured (the scheduler times each
    pass on the CPU), and how many of a guess's tokens are worth their rows.

    Verifying k more tokens in a pass of R rows for B sequences keeps, on average,
    a + a^2 + ... + a^k tokens (a: the sequence's Acceptance.rate), and costs the extra time
    cost(R + k) - cost(R), in which plain steps would have given every sequence
    B * (cost(R + k) - cost(R)) / cost(R) tokens. A guess is cut to the length that gains
    most, none where nothing gains: at batch 1 on a memory-bound CPU a few more rows cost
    little, in a wide batch on a compute-bound one they cost their share."""

    KEEP = 8  # the latest passes of each row count whose median is its cost
    TRUSTED = 3  # passes of a row count measured before its cost is used (one slow pass is noise)
    STALE = 256  # passes after which a measurement is forgotten, so that a count cut away is tried again

    def __init__(self):
        self.passes = 0
        self.seconds: dict[int, list[tuple[int, float]]] = {}  # rows -> [(pass number, seconds)]

    def record(self, rows: int, seconds: float) -> None:
        self.passes += 1
        recent = self.seconds.setdefault(rows, [])
        recent.append((self.passes, seconds))
        del recent[: -self.KEEP]

    def trusted(self) -> dict[int, float]:
        """Each row count's cost, where it was measured often and lately enough."""
        fresh = {r: [s for n, s in samples if n > self.passes - self.STALE] for r, samples in self.seconds.items()}
        return {r: statistics.median(s) for r, s in fresh.items() if len(s) >= self.TRUSTED}

    def estimate(self, rows: int, costs: dict[int, float] | None = None) -> float | None:
        """The measured cost of `rows` rows, or one interpolated between the nearest measured
        counts; past the widest measured, that one's (optimistic: the pass then measures it).
        `costs`: trusted()'s table, when the caller already has it."""
        costs = self.trusted() if costs is None else costs
        if not costs:
            return None
        below = max((r for r in costs if r <= rows), default=min(costs))
        above = min((r for r in costs if r >= rows), default=max(costs))
        if above == below:
            return costs[below]
        return costs[below] + (costs[above] - costs[below]) * (rows - below) / (above - below)

    def worth(self, rows: int, sequences: int, guess: int, acceptance: float) -> int:
        """How many of a `guess`-token guess to verify in a pass of `rows` rows so far for
        `sequences` sequences: all of it until costs are measured."""
        costs = self.trusted()  # once: the scheduler asks this for every guess of every step
        base = self.estimate(rows, costs)
        if base is None or base <= 0:
            return guess
        best, best_gain, kept = 0, 0.0, 0.0
        for k in range(1, guess + 1):
            kept += acceptance**k
            gain = kept - sequences * (self.estimate(rows + k, costs) - base) / base
            if gain > best_gain:
                best, best_gain = k, gain
        return best
