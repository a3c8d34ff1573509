"""Grammar-constrained decoding with llguidance: which tokens may come next.

A `Constraint` is a plain value (a JSON schema, a Lark or GBNF grammar, a regex) that
travels in `SamplingParams`; `GrammarCompiler` turns it, for one model's tokenizer, into
a `TokenMatcher` per sequence, which a backend asks for the allowed-token mask before
each sample and tells the token it chose. The same matcher serves both backends: the
mask is a numpy bit array computed on the host (llguidance drops the GIL meanwhile).

JSON comes out compact (no free whitespace): a model that may write spaces between
tokens of a JSON value can also write nothing but spaces until `max_tokens`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import llguidance
import numpy as np

from elmd.engine.protocol import Constraint
from elmd.engine.tokenizer import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False}
# llguidance drops the GIL while it computes a mask, so this thread runs beside the model's.
_MASKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elmd-grammar")


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile; the message names the feature."""


@lru_cache(maxsize=256)
def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar of a constraint, checked (without a tokenizer: no model
    needed, so a request can be refused before one loads). Raises GrammarError."""
    try:
        if constraint.kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint.source, overrides=JSON_OPTIONS)
        elif constraint.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(constraint.source)
        elif constraint.kind in ("lark", "gbnf"):
            grammar = llguidance.grammar_from(constraint.kind, constraint.source)
        else:
            raise GrammarError(f"unknown grammar kind {constraint.kind!r}")
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(error)
    return grammar


class TokenMatcher:
    """One sequence's position in its grammar. The mask for the next token is computed on
    a helper thread as soon as the last token is known, so it overlaps the model's step
    (or the prompt, for the first one) instead of following it."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher = matcher
        self._words = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)
        self.vocab_size = vocab_size
        self.done = False  # the grammar is complete and its end (EOS) consumed: nothing may follow
        self._next: Future[np.ndarray] = _MASKS.submit(self._mask)

    def _mask(self) -> np.ndarray:
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def allowed(self) -> np.ndarray:
        """Which tokens may come next: bool[vocab_size]. Only EOS once the grammar is complete."""
        return self._next.result()

    def consume(self, token_id: int) -> None:
        """Advance past the chosen token and start on the next mask. A token the mask
        forbade is a bug, not a user error. (The matcher is touched here and on the mask
        thread only, one after the other: llguidance refuses concurrent use.)"""
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"grammar refused token {token_id}: {self._matcher.get_error()}")
        self.done = self._matcher.is_stopped()
        self._next = _MASKS.submit(self._mask)  # once done: EOS only (MLX samples once more)


class GrammarCompiler:
    """Makes matchers for one model: its tokenizer as llguidance sees it (built once from
    tokenizer.json, ~0.1 s for a 49k vocabulary) and `vocab_size` (the logits' width,
    which may exceed the tokenizer's)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        source = tokenizer.tokenizer_json()
        if source is None:
            raise GrammarError("structured output needs the model's tokenizer.json (this model has only tokenizer.model)")
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.LLTokenizer(source, n_vocab=max(vocab_size, tokenizer.vocab_size),
                                                 eos_token=sorted(tokenizer.eos_ids))

    def matcher(self, constraint: Constraint) -> TokenMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, grammar_of(constraint), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return TokenMatcher(matcher, self.vocab_size)
