"""A model that says exactly what a test needs, at the backend boundary (engine/protocol.py).

`EchoBackend` "generates" the prompt's own tokens again, one every `interval` seconds, on a
worker thread, and never stops by itself (no EOS): only max_tokens or a cancelled channel
end it. So a reply repeats the user's message verbatim (including any `<script>` in it),
and a long reply lasts until the client closes the stream. Everything above the backend
(engine, detokenizer, routes, streaming, metrics) is the daemon's real code.
"""

from __future__ import annotations

import threading
from pathlib import Path

from elmd.engine.engine import Engine
from elmd.engine.protocol import BackendInfo, CacheBytes, Finished, SamplingParams, Step, StepChannel
from elmd.engine.tokenizer import Tokenizer


class EchoBackend:
    def __init__(self, context_length: int, vocab_size: int, interval: float):
        self.info = BackendInfo(name="echo", device="cpu", dtype="float32", quant="none",
                                context_length=context_length, vocab_size=vocab_size, memory_bytes=1)
        self.interval = interval
        self.finished: list[Finished] = []  # how each generation ended, in order
        self._closed = threading.Event()

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
               matcher=None) -> StepChannel:
        assert matcher is None, "the echo model cannot follow a grammar"
        channel = StepChannel()
        echo = [t for t in prompt_ids if t not in stop_ids] or [prompt_ids[0]]
        threading.Thread(target=self._run, args=(channel, echo, params.max_tokens), daemon=True).start()
        return channel

    def _run(self, channel: StepChannel, echo: list[int], max_tokens: int) -> None:
        for i in range(max_tokens):
            if channel.cancelled or self._closed.is_set():
                return self._finish(channel, Finished("cancelled"))
            channel.put(Step(echo[i % len(echo)]))
            self._closed.wait(self.interval)
        self._finish(channel, Finished("length"))

    def _finish(self, channel: StepChannel, finished: Finished) -> None:
        self.finished.append(finished)
        channel.close(finished)

    def score(self, token_ids, top_n):
        raise NotImplementedError("the echo model only generates")

    def cache_bytes(self) -> CacheBytes:
        return CacheBytes(kv_cache=0)

    def speculated_tokens(self) -> tuple[int, int]:
        return 0, 0

    def limit_cache(self, budget) -> None:
        pass  # it holds no cache

    def close(self) -> None:
        self._closed.set()


def echo_engine(model_id: str, tokenizer_dir: Path, interval: float) -> Engine:
    """An engine over EchoBackend with the tokenizer (and chat template) in `tokenizer_dir`."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    return Engine(model_id, EchoBackend(2048, tokenizer.vocab_size, interval), tokenizer)
