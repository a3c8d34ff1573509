"""Keys and values of earlier sequences, reused when a new prompt starts with them.

A chat's next turn repeats the whole history; reusing its KV turns a long prefill into a
short one. Entries are bounded in bytes and evicted least recently used. Reuse is exact:
the same tokens at the same positions give the same keys and values. Both backends keep
one: PyTorch's entries are per-layer (k, v) tensors, MLX's are mlx-lm's per-layer caches;
`size` measures an entry. Entries live in spaces (a LoRA adapter's index; 0 the base): the
same tokens under another adapter have other keys and values.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable


def torch_kv_bytes(kv) -> int:
    """Bytes of a PyTorch entry: per layer, k and v as [kv_heads, n, head_dim]."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    def __init__(self, max_bytes: int, size: Callable[[Any], int] = torch_kv_bytes):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, tuple[int, ...]], Any] = OrderedDict()  # (space, tokens) -> entry
        self.bytes = 0
        self._size = size

    def lookup(self, tokens: list[int], space: int = 0) -> tuple[int, Any]:
        """The longest cached prefix of `tokens` in `space`, leaving at least one token to compute
        (the model needs it for the next logits)."""
        best, best_key = 0, None
        limit = len(tokens) - 1
        for key in self.entries:
            if key[0] != space:
                continue
            n = min(_common_prefix(key[1], tokens), limit)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        return best, self.entries[best_key]

    def store(self, tokens: list[int], kv: Any, space: int = 0) -> None:
        key = tuple(tokens)
        if self.max_bytes <= 0 or not key:
            return
        for other in list(self.entries):
            if other[0] != space:
                continue
            if other[1][: len(key)] == key:  # already covered by a longer entry
                self.entries.move_to_end(other)
                return
            if key[: len(other[1])] == other[1]:  # the new entry covers an older one
                self.bytes -= self._size(self.entries.pop(other))
        size = self._size(kv)
        if size > self.max_bytes:
            return
        self.entries[(space, key)] = kv
        self.bytes += size
        self.shrink(self.max_bytes)

    def shrink(self, max_bytes: int) -> None:
        """Evict least recently used entries until they take at most `max_bytes`."""
        while self.entries and self.bytes > max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= self._size(evicted)

    def drop_space(self, space: int) -> None:
        """Forget the entries of `space` (an adapter unloaded)."""
        for key in [k for k in self.entries if k[0] == space]:
            self.bytes -= self._size(self.entries.pop(key))

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
