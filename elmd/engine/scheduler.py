"""Continuous batching for the PyTorch backend.

One worker thread owns the model: it loads it, and every computation on it runs there.
Each iteration it runs queued jobs (scoring), admits waiting requests into free KV-cache
slots (reusing cached prefixes), runs one prefill chunk, then one decode step for every
running sequence together. Requests join and leave between steps; a cancelled channel
frees its slot before the next step.

Why one thread for everything: libgomp keeps a thread pool per thread that has run a
parallel region, and once it manages more threads than there are CPUs it stops letting
idle workers spin, so every parallel region waits for a sleeping worker to wake up.
Loading on one thread and decoding on another ran a 270M int4 step at half speed
(70 vs 140 tok/s; each native matmul 160 instead of 60 us).
"""

from __future__ import annotations

import atexit
import collections
import heapq
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from elmd.engine.grammar import TokenMatcher
from elmd.engine.openelm import OpenELM
from elmd.engine.runner import Runner
from elmd.engine.prefix_cache import PrefixCache
from elmd.engine.protocol import Finished, SamplingParams, Step, StepChannel
from elmd.engine.sampling import Sampler
from elmd.engine.speculation import DraftModel, DraftProposer, PassCosts, PromptLookup


_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()  # workers stopped at exit


@atexit.register
def _stop_at_exit() -> None:
    """Park every worker before the interpreter finalizes: a daemon thread still inside torch
    then (a step finishing after its caller's last token, a kernel switch) is ended by the
    interpreter mid-C++, and the process aborts ("terminate called without an active exception")."""
    for scheduler in list(_live):
        scheduler.stop()


@dataclass
class Sequence:
    channel: StepChannel
    params: SamplingParams
    stop_ids: frozenset[int]
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    matcher: TokenMatcher | None = None  # the grammar's allowed tokens, for a constrained sequence
    sampler: Sampler | None = None  # made on the worker when the sequence is admitted
    lookup: PromptLookup | DraftProposer | None = None  # when it speculates
    adapter: int = 0  # the LoRA adapter's index in the runner's AdapterSet (0: the base)
    slot: int = -1
    filled: int = 0  # tokens whose keys and values are in the slot
    generated: int = 0


def _over_budget(needed: int, budget: int) -> str:
    return (f"The KV cache would need {needed >> 20} MiB, more than the {max(budget, 0) >> 20} MiB the memory "
            "budget leaves this model (ELMD_MEMORY_BUDGET_BYTES); retry with a shorter prompt or fewer requests at once.")


def _doubled(size: int, needed: int, limit: int) -> int:
    """`size` doubled until it holds `needed`, at most `limit`."""
    while size < needed:
        size *= 2
    return min(size, limit)


class Scheduler:
    # The KV cache starts as one row of this many tokens. Rows double as more sequences run
    # at once (each takes the lowest free slot) and length doubles as they grow, up to the
    # slots and the context; both shrink back when the daemon goes idle. So memory follows
    # use: one long conversation holds one row, not one per slot.
    INITIAL_CACHE_TOKENS = 256
    def __init__(self, load_model: Callable[[], Runner], slots: int, prefill_chunk: int = 256,
                 prefix_cache_bytes: int = 0, speculation: bool = False,
                 load_draft: Callable[[], Runner] | None = None):
        """Start the worker, load the model on it with `load_model` (and the draft model
        with `load_draft`), and return once it is ready (raising what the load raised).
        `speculation`: decoding sequences verify guesses in their steps (elmd/engine/speculation.py):
        the draft model's where there is one (for a sequence decoding alone), else prompt lookup's."""
        self.speculation = speculation
        self.draft: DraftModel | None = None
        self.proposed_tokens = 0  # speculated tokens verified, and of them accepted
        self.accepted_tokens = 0
        self.slots = slots
        self.free = list(range(slots))  # a heap: the lowest free slot is taken first
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.jobs: collections.deque[tuple[Callable, Future]] = collections.deque()
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        # Bytes the KV cache and cached prefixes may take now (None: no limit); the daemon
        # sets it to its memory budget less what its other models and these weights hold.
        self.cache_budget: Callable[[], int | None] = lambda: None
        self._wake = threading.Condition()
        self._stopping = False
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(load_model, load_draft, loaded), name="elmd-scheduler",
                                        daemon=True)
        self._thread.start()
        _live.add(self)
        loaded.result()

    def _setup(self, runner: Runner) -> None:
        model = runner.model
        self.device = model.rope_cos.device
        # In a batch of sequences, guesses are cut to what their rows are worth by measured
        # pass costs (a lone sequence's proposer decides alone: its few rows ride on a step
        # bound by reading the weights). On the CPU, where a pass's time is known when it
        # returns (a GPU's would need a sync).
        self.pass_costs = PassCosts() if self.device.type == "cpu" else None
        self.max_len = model.cfg.context_length
        self.initial_len = min(self.INITIAL_CACHE_TOKENS, self.max_len)
        model.setup_caches(1, self.initial_len)
        self.model: OpenELM = model
        self.runner = runner

    # -- called from any thread ------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
               matcher: TokenMatcher | None = None, adapter: int = 0) -> StepChannel:
        channel = StepChannel()
        seq = Sequence(channel, params, stop_ids, list(prompt_ids), len(prompt_ids), matcher, adapter=adapter)
        with self._wake:
            self.waiting.append(seq)
            self._wake.notify()
        return channel

    def call(self, fn: Callable):
        """Run fn() on the worker between steps (under inference mode) and return its result."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler has stopped")
            self.jobs.append((fn, future))
            self._wake.notify()
        return future.result()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the worker ------------------------------------------------------------------
    def _loop(self, load_model: Callable[[], Runner], load_draft: Callable[[], Runner] | None, loaded: Future) -> None:
        try:
            self._setup(load_model())
            if load_draft is not None:
                with torch.inference_mode():
                    self.draft = DraftModel(load_draft(), self.device)
        except BaseException as e:
            loaded.set_exception(e)
            return
        loaded.set_result(None)
        with torch.inference_mode():  # every cache write, resize and prefix copy happens here
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running and not self.jobs:
                    self._wake.wait()
                if self._stopping:
                    break
            self._run_jobs()
            try:
                self._iteration()
            except Exception as e:  # a failed step ends its sequences, never the daemon
                for seq in self.running + list(self.waiting):
                    self._finish(seq, Finished("error", error=f"{type(e).__name__}: {e}"), keep=False)
                self.waiting.clear()
        for seq in self.running + list(self.waiting):
            self._finish(seq, Finished("cancelled"), keep=False)
        with self._wake:
            for _, future in self.jobs:
                future.set_exception(RuntimeError("the scheduler has stopped"))
            self.jobs.clear()

    def _run_jobs(self) -> None:
        while self.jobs:
            with self._wake:
                fn, future = self.jobs.popleft()
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

    def _iteration(self) -> None:
        for seq in [s for s in self.running if s.channel.cancelled]:
            self._finish(seq, Finished("cancelled"))
        self._admit()
        prefilling = next((s for s in self.running if s.filled < s.prompt_len), None)
        self._ensure_cache()
        if prefilling is not None:
            self._prefill_chunk(prefilling)
            self._ensure_cache()  # a last chunk's sampled token is cached below, maybe past the cache's end
        decoding = [s for s in self.running if s.generated > 0 and s.filled == len(s.tokens) - 1]
        if decoding:
            self._decode(decoding)

    def _speculates(self, seq: Sequence) -> bool:
        """Whether `seq` decodes with proposals: not under a grammar, whose matcher takes
        one token at a time after the mask it computed ahead."""
        return self.speculation and seq.matcher is None

    def _ensure_cache(self) -> None:
        """Grow the KV cache to the rows and the length the running sequences need, within
        the memory budget: past it, growth stops doubling, cached prefixes are dropped, and
        then the sequence that needs the growth ends with Finished("memory")."""
        while self.running:
            rows, length = self.model.cache_shape
            need_rows = max(s.slot for s in self.running) + 1
            need_length = max(len(s.tokens) for s in self.running)
            new_rows, new_length = _doubled(rows, need_rows, self.slots), _doubled(length, need_length, self.max_len)
            if (new_rows, new_length) == (rows, length):
                return
            budget = self.cache_budget()
            if budget is not None and self.model.cache_bytes(new_rows, new_length) + self.prefix_cache.bytes > budget:
                new_rows, new_length = max(rows, need_rows), max(length, need_length)
                self.prefix_cache.shrink(budget - self.model.cache_bytes(new_rows, new_length))
                if self.model.cache_bytes(new_rows, new_length) > budget:
                    grows_length = need_length > length
                    victim = max(self.running, key=lambda s: len(s.tokens) if grows_length else s.slot)
                    self._finish(victim, Finished("memory", error=_over_budget(self.model.cache_bytes(new_rows, new_length), budget)),
                                 keep=False)
                    continue
            self.model.resize_caches(new_rows, new_length)

    def _admit(self) -> None:
        with self._wake:
            while self.waiting and self.free:
                seq = self.waiting.popleft()
                if seq.channel.cancelled:
                    seq.channel.close(Finished("cancelled"))
                    continue
                if seq.params.max_tokens <= 0 or seq.prompt_len >= self.max_len:
                    seq.channel.close(Finished("length"))
                    continue
                if seq.adapter and seq.adapter not in self.runner.adapters.prepared:  # unloaded since it was submitted
                    seq.channel.close(Finished("error", error="its LoRA adapter was unloaded; send the request again"))
                    continue
                seq.slot = heapq.heappop(self.free)
                seq.sampler = Sampler(seq.params, seq.tokens, self.model.cfg.vocab_size, self.device, seq.matcher)
                if self._speculates(seq):
                    seq.lookup = DraftProposer(self.draft) if self.draft is not None else PromptLookup()
                self.running.append(seq)
                self._reuse_prefix(seq)

    def uses_adapter(self, index: int) -> bool:
        """Whether a running or waiting sequence decodes with adapter `index` (worker thread)."""
        return any(seq.adapter == index for seq in self.running + list(self.waiting))

    def _reuse_prefix(self, seq: Sequence) -> None:
        n, kv = self.prefix_cache.lookup(seq.tokens, seq.adapter)
        if kv is None:
            return
        self._ensure_cache()
        for block, (k, v) in zip(self.model.transformer.layers, kv):
            block.attn.cache.k[seq.slot, :, :n] = k[:, :n]
            block.attn.cache.v[seq.slot, :, :n] = v[:, :n]
        seq.filled = n
        seq.channel.cached_tokens = n

    def _prefill_chunk(self, seq: Sequence) -> None:
        start = seq.filled
        end = min(seq.prompt_len, start + self.prefill_chunk)
        tokens = torch.tensor([seq.tokens[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        slots = torch.tensor([seq.slot], device=self.device)
        logits = self.runner(tokens, positions, slots, span=end, last_only=True, adapters=[seq.adapter])
        seq.filled = end
        if end == seq.prompt_len:
            self._emit(seq, logits[0, -1].float())

    def _decode(self, batch: list[Sequence]) -> None:
        """One decode step for every sequence in `batch`, with the guesses of those that
        speculate (prompt lookup's, or the draft model's) verified in the same pass: each
        sequence gives the rows [last token + guess] at its next positions, all rows go through
        the model as one batch of single-token rows (a row's keys and values are written before
        any row attends, so a guess's later rows see its earlier ones), and each sequence then
        walks its own rows (_accept). On the native plan a row's logits are bitwise the same
        in any batch (tests/test_batch_invariance.py), so speculation changes no output."""
        # With a draft model (which keeps one sequence's keys and values) only a sequence
        # decoding alone is asked for a guess; prompt lookup guesses for every one.
        asked = [seq.lookup is not None and (self.draft is None or len(batch) == 1) for seq in batch]
        guesses, rows = [], len(batch)
        for seq, ask in zip(batch, asked):
            guess = self._propose(seq) if ask else []
            if guess and self.pass_costs is not None and len(batch) > 1:
                guess = guess[: self.pass_costs.worth(rows, len(batch), len(guess), seq.lookup.acceptance.rate)]
            guesses.append(guess)
            rows += len(guess)
        tokens = [t for seq, guess in zip(batch, guesses) for t in (seq.tokens[-1], *guess)]
        positions = [seq.filled + i for seq, guess in zip(batch, guesses) for i in range(1 + len(guess))]
        slots = [seq.slot for seq, guess in zip(batch, guesses) for _ in range(1 + len(guess))]
        adapters = ([seq.adapter for seq, guess in zip(batch, guesses) for _ in range(1 + len(guess))]
                    if any(seq.adapter for seq in batch) else None)
        span = max(positions) + 1  # known here; on a GPU, reading it back would sync
        started = time.perf_counter()
        logits = self.runner(torch.tensor(tokens, device=self.device)[:, None],
                             torch.tensor(positions, device=self.device)[:, None],
                             torch.tensor(slots, device=self.device), span=span, adapters=adapters)[:, -1].float()
        if self.pass_costs is not None:
            self.pass_costs.record(rows, time.perf_counter() - started)
        row = 0
        for seq, guess, ask in zip(batch, guesses, asked):
            self._accept(seq, guess, logits[row : row + 1 + len(guess)], ask)
            row += 1 + len(guess)

    def _propose(self, seq: Sequence) -> list[int]:
        """`seq`'s guess at its next tokens (empty: a plain step)."""
        room = min(self.model.cache_length - len(seq.tokens), seq.params.max_tokens - seq.generated - 1)
        return seq.lookup.propose(seq.tokens, room) if room > 0 else []

    def _accept(self, seq: Sequence, guess: list[int], logits: torch.Tensor, asked: bool) -> None:
        """Walk `seq`'s rows of a step: its sampler picks a token from each row's logits as
        plain steps would, keeping guessed tokens while it picks them and stopping at the
        first it does not (keeping its own pick). Exact for any sampling: a guess made without
        the target's logits (copied, or the draft's greedy pick) is a point-mass draft, for
        which speculative rejection sampling is this walk. Positions past the first miss leave
        keys and values beyond `filled`, which later steps overwrite. `asked`: whether the
        sequence's proposer was asked for this step's guess (it then learns the outcome)."""
        self.proposed_tokens += len(guess)
        for accepted in range(len(guess) + 1):
            seq.filled += 1
            self._emit(seq, logits[accepted])
            if seq not in self.running or accepted == len(guess) or seq.tokens[-1] != guess[accepted]:
                break
            self.accepted_tokens += 1  # before the step that may close the channel, so readers see it
        if asked and seq in self.running:
            seq.lookup.record(guess, accepted, seq.tokens[-1])

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the next token, report it, and finish the sequence if it is time."""
        if seq.channel.cancelled:
            self._finish(seq, Finished("cancelled"))
            return
        token, logprob = seq.sampler.sample(logits)
        seq.tokens.append(token)
        seq.generated += 1
        seq.channel.put(Step(token, logprob))
        if (token in seq.stop_ids and not seq.params.ignore_eos) or (seq.matcher is not None and seq.matcher.done):
            self._finish(seq, Finished("eos"))
        elif seq.generated >= seq.params.max_tokens or len(seq.tokens) >= self.max_len:
            self._finish(seq, Finished("length"))

    def _finish(self, seq: Sequence, finished: Finished, keep: bool = True) -> None:
        if keep and seq.filled > 0 and self.prefix_cache.max_bytes > 0:
            self.prefix_cache.store(seq.tokens[: seq.filled], self._slot_kv(seq.slot, seq.filled), seq.adapter)
        if seq in self.running:
            self.running.remove(seq)
            heapq.heappush(self.free, seq.slot)
        idle = not self.running and not self.waiting
        if idle and self.model.cache_shape != (1, self.initial_len):
            self.model.resize_caches(1, self.initial_len)
        budget = self.cache_budget()
        if budget is not None:  # cached prefixes take what the running sequences leave
            self.prefix_cache.shrink(budget - self.model.cache_bytes())
        seq.channel.close(finished)

    def _slot_kv(self, slot: int, n: int):
        return [
            (b.attn.cache.k[slot, :, :n].clone(), b.attn.cache.v[slot, :, :n].clone())
            for b in self.model.transformer.layers
        ]
