"""An embedding model as the service holds it: what the model manager needs of any resident
model (sizes, keep-alive, unload), and what the embeddings routes need (token ids, vectors).

The manager keeps generators (`engine.Engine`) and encoders (`EmbeddingEngine`) side by
side under one memory budget and one keep-alive; `kind` tells the routes which requests a
model answers, so they never look at its class. An encoder has no KV cache and no prefix
cache: what it holds is its weights. Forward passes run in a worker thread (the event loop
keeps serving) and take turns (the Embedder's lock), each on every intra-op thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence, TypeVar

import torch

from elmd.engine.embedder import Embedder, InputTooLong
from elmd.engine.protocol import BackendInfo, CacheBytes
from elmd.engine.threads import in_own_thread

__all__ = ["EmbeddingEngine", "Embeddings", "InputTooLong"]

T = TypeVar("T")


class Embeddings(Protocol):
    """What the embeddings routes use of a model."""

    kind: str  # "embedding"
    dimensions: int
    max_length: int  # tokens per input, special tokens included
    matryoshka: bool  # whether vectors may be cut to fewer dimensions
    normalize: bool  # whether vectors are L2-normalised (then so is a cut one)

    def encode(self, texts: Sequence[str], truncate: bool = False) -> list[list[int]]: ...

    def check(self, token_id_lists: Sequence[Sequence[int]]) -> None: ...

    def embed(self, token_id_lists: Sequence[Sequence[int]]) -> torch.Tensor: ...

    async def in_worker(self, fn: Callable[[], T]) -> T: ...


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class EmbeddingEngine:
    """A loaded sentence encoder (elmd/engine/embedder.py) with the manager's resident-model
    surface: `info`, `resident_bytes`, `cache_bytes`, `limit_cache`, `speculated_tokens`,
    `context_length`, `watch`, `close`."""

    kind = "embedding"

    def __init__(self, model_id: str, embedder: Embedder, *, matryoshka: bool = False, dtype: str = "float32",
                 quant: str = "none"):
        self.model_id, self.embedder, self.matryoshka = model_id, embedder, matryoshka
        cfg = embedder.model.cfg
        self.info = BackendInfo(name="torch", device="cpu", dtype=dtype, quant=quant,
                                context_length=embedder.max_length, vocab_size=cfg.vocab_size,
                                memory_bytes=_weight_bytes(embedder.model), extra={"kind": "embedding"})
        self.watch: Callable = lambda prompt_tokens: None  # generation metrics: an encoder generates nothing
        self.dimensions, self.max_length, self.normalize = embedder.dimensions, embedder.max_length, embedder.normalize
        self._closed = False

    @classmethod
    def load(cls, path: str | Path, model_id: str, dtype: str = "auto", matryoshka: bool = False,
             quant: str = "none") -> "EmbeddingEngine":
        """The model in `path` (hub layout, sentence-transformers' modules.json); `auto` is
        float32; `quant` int8 or int4 quantizes its linear layers at load (`serve --quant`)."""
        dtype = "float32" if dtype == "auto" else dtype
        if quant == "bf16":  # `serve --quant bf16` for every model: an encoder runs in bf16 for it
            dtype, quant = "bfloat16", "none"
        return cls(model_id, Embedder.from_dir(path, dtype, quant), matryoshka=matryoshka, dtype=dtype, quant=quant)

    # ------------------------------------------------------------------ embeddings

    @property
    def context_length(self) -> int:
        return self.max_length

    def encode(self, texts: Sequence[str], truncate: bool = False) -> list[list[int]]:
        return self.embedder.encode(texts, truncate)

    def check(self, token_id_lists: Sequence[Sequence[int]]) -> None:
        self.embedder.check(token_id_lists)

    async def in_worker(self, fn: Callable[[], T]) -> T:
        """fn() in a thread of its own (forwards take turns on the Embedder's lock): a thread kept
        for the encoder would keep its OpenMP team beside a chat model's scheduler, whose every
        decode step then waits on woken threads (elmd/engine/threads.py)."""
        if self._closed:
            raise RuntimeError(f"{self.model_id} is unloaded")
        return await in_own_thread(fn)

    def embed(self, token_id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """float32 [n, dimensions]."""
        return self.embedder.embed(token_id_lists)

    # ------------------------------------------------------------------ residency

    def resident_bytes(self) -> int:
        return self.info.memory_bytes

    def cache_bytes(self) -> CacheBytes:
        return CacheBytes(kv_cache=0, prefix_cache=0)

    def limit_cache(self, budget: Callable[[], int | None]) -> None:
        """No cache to limit."""

    def speculated_tokens(self) -> tuple[int, int]:
        return 0, 0

    def close(self) -> None:
        """Let the weights go (the manager unloads a model only when no request holds it)."""
        self._closed = True
        self.embedder = None
