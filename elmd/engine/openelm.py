"""OpenELM in PyTorch: the config, the network and its static KV cache.

One file, gpt-fast style. `forward(tokens, positions, slots)` takes explicit positions
and cache rows, so prefill, batched decode of sequences at different lengths, and
scoring without a cache are the same code. Weight names match the hub checkpoint
(`transformer.layers.N.attn.qkv_proj.weight`, ...), so loading is a plain state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elmd.engine.protocol import context_length


def make_divisible(v: float, divisor: int) -> int:
    """Apple's rounding rule for layer widths (make_divisible in their modeling_openelm.py)."""
    n = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if n < 0.9 * v:
        n += divisor
    return int(n)


def _linspace(lo: float, hi: float, n: int) -> list[float]:
    return [round(lo + (hi - lo) * i / max(n - 1, 1), 2) for i in range(n)]


@dataclass
class OpenELMConfig:
    vocab_size: int
    model_dim: int
    head_dim: int
    num_transformer_layers: int
    num_query_heads: list[int]
    num_kv_heads: list[int]
    ffn_multipliers: list[float]
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    max_context_length: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "OpenELMConfig":
        """Build from config.json, deriving per-layer lists the way Apple's config does when
        only the multiplier ranges are given."""
        if d.get("model_type") != "openelm":
            raise ValueError(f"unsupported model_type {d.get('model_type')!r}: elmd serves 'openelm' checkpoints")
        d = dict(d)
        layers = int(d["num_transformer_layers"])
        if "num_query_heads" not in d or not isinstance(d["num_query_heads"], list):
            groups = int(d.get("num_gqa_groups", 4))
            lo, hi = d.get("qkv_multipliers", (0.5, 1.0))
            q_heads = [
                make_divisible(d["model_dim"] * m, d["head_dim"] * groups) // d["head_dim"]
                for m in _linspace(lo, hi, layers)
            ]
            d["num_query_heads"] = q_heads
            d["num_kv_heads"] = [q // groups for q in q_heads]
        ffn = d.get("ffn_multipliers", (0.5, 4.0))
        if not isinstance(ffn, list) or len(ffn) != layers:
            d["ffn_multipliers"] = _linspace(ffn[0], ffn[1], layers) if len(ffn) == 2 else [ffn[0]] * layers
        names = {f.name for f in fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        n = self.num_transformer_layers
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"config: {name} has {len(getattr(self, name))} entries for {n} layers")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if kv <= 0 or q % kv:
                raise ValueError(f"config: layer {i} has {q} query heads, not a multiple of {kv} kv heads")

    @property
    def ffn_dims(self) -> list[int]:
        return [make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers]

    @property
    def context_length(self) -> int:
        return context_length(vars(self))

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * sum(self.num_kv_heads) * self.head_dim * elem


class RMSNorm(nn.Module):
    """RMSNorm, accumulated in fp32 (one fused op: the model has 4L+1 of them)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class KVCache(nn.Module):
    """Static, preallocated keys and values for `slots` sequences of up to `length` tokens,
    in the model's dtype or a narrower one (float16 beside float32 activations)."""

    def __init__(self, slots: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (slots, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: int):
        """Write k, v ([B, H, T, D]) at `positions` ([B, T]) of rows `slots` ([B]); return the
        first `span` positions of those rows.

        One sequence on the CPU takes plain slices. Elsewhere rows are scattered and gathered by
        index: reading the slot back would make the host wait for the device, and a step that
        reads nothing back can be captured as a CUDA graph."""
        if slots.numel() == 1 and slots.device.type == "cpu":  # consecutive positions, no gathers
            s, start = int(slots[0]), int(positions[0, 0])
            self.k[s, :, start : start + k.shape[2]] = k[0]
            self.v[s, :, start : start + v.shape[2]] = v[0]
            keys, values = self.k[s : s + 1, :, :span], self.v[s : s + 1, :, :span]
        else:
            rows = slots[:, None]
            self.k[rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
            keys, values = self.k[slots, :, :span], self.v[slots, :, :span]
        return keys.to(k.dtype), values.to(v.dtype)


def rope_tables(head_dim: int, length: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin ([-sin, sin] halves) per position, so that rotate-half RoPE is
    `x * cos + x.roll(D/2) * sin`. Computed in float64 by numpy whatever the device (MPS has no
    float64), then moved: torch's float64 cos runs MKL's vector math in OpenMP threads nested in
    its own, and an OpenMP team beside the scheduler's throttles it (elmd/engine/threads.py)."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    tables = (np.concatenate([cos, cos], axis=-1), np.concatenate([-sin, sin], axis=-1))
    return tuple(torch.from_numpy(t.astype(np.float32)).to(device) for t in tables)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE over the whole head, in fp32; cos/sin are [B, 1, T, D]."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per sequence, as two small matmuls with the query heads
    grouped under their kv head: on the CPU 6x faster than SDPA's flash kernel at this shape
    (20 heads over 128 positions: 53 vs 304 us)."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    scores = q.view(B, kv_heads, H // kv_heads, D) @ k.transpose(-1, -2) * D**-0.5
    if mask is not None:  # [B, 1, 1, S]: positions each sequence may see
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores.float(), dim=-1).type_as(v) @ v).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, cfg: OpenELMConfig, layer: int):
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = cfg.num_query_heads[layer], cfg.num_kv_heads[layer], cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.model_dim, (self.q_heads + 2 * self.kv_heads) * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(self.q_heads * cfg.head_dim, cfg.model_dim, bias=False)
        if cfg.normalize_qk_projections:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.normalize_qk_projections
        self.cache: KVCache | None = None
        self.decode_attention = decode_attention  # the compiled CUDA step swaps in another form

    def forward(self, x, cos, sin, slots, positions, mask, span):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.q_heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.q_heads, self.kv_heads, self.kv_heads], dim=1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slots is not None:
            k, v = self.cache.update(slots, positions, k, v, span)
        y = self.decode_attention(q, k, v, mask) if T == 1 else F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.q_heads != self.kv_heads
        )
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.q_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: OpenELMConfig, layer: int):
        super().__init__()
        width = cfg.ffn_dims[layer]
        self.glu = cfg.ffn_with_glu
        self.proj_1 = nn.Linear(cfg.model_dim, (2 if self.glu else 1) * width, bias=False)
        self.proj_2 = nn.Linear(width, cfg.model_dim, bias=False)

    def forward(self, x):
        h = self.proj_1(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            return self.proj_2(F.silu(gate) * up)
        return self.proj_2(F.silu(h))


class Block(nn.Module):
    def __init__(self, cfg: OpenELMConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.model_dim, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.model_dim, cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg, layer)

    def forward(self, x, cos, sin, slots, positions, mask, span):
        h = x + self.attn(self.attn_norm(x), cos, sin, slots, positions, mask, span)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenELMConfig):
        super().__init__()
        # Weights always come from a checkpoint, so the embedding skips its N(0, 1) init (on the
        # meta device, its first use imports torch._refs: ~1.2 s of the daemon's start).
        empty = torch.empty(cfg.vocab_size, cfg.model_dim)
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.model_dim, _weight=empty)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_transformer_layers))
        self.norm = RMSNorm(cfg.model_dim, cfg.rms_norm_eps)


class OpenELM(nn.Module):
    def __init__(self, cfg: OpenELMConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        if not cfg.share_input_output_layers:
            self.lm_head = nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_max_length, cfg.rope_freq_constant)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype
        self.cache_shape = (0, 0)  # (slots, length) of every layer's KV cache, kept by the methods that make them

    def setup_caches(self, slots: int, length: int | None = None) -> None:
        """Allocate the KV cache: `slots` sequences of `length` tokens (default: the context),
        in `kv_cache_dtype`."""
        length = length or self.cfg.context_length
        p = self.transformer.norm.weight  # a quantized embedding has no float weight to follow
        for block in self.transformer.layers:
            a = block.attn
            a.cache = KVCache(slots, a.kv_heads, length, a.head_dim, self.kv_cache_dtype or p.dtype, p.device)
        self.cache_shape = (slots, length)

    def set_kv_cache_dtype(self, dtype: torch.dtype | None) -> None:
        """Keep keys and values in `dtype` (None: the model's), converting the cached ones."""
        self.kv_cache_dtype = dtype
        dtype = dtype or self.transformer.norm.weight.dtype
        for block in self.transformer.layers:
            cache = block.attn.cache
            if cache is not None and cache.k.dtype != dtype:
                cache.k, cache.v = cache.k.to(dtype), cache.v.to(dtype)

    def resize_caches(self, slots: int, length: int) -> None:
        """Make the cache `slots` rows of `length` tokens, keeping what fits of the cached ones."""
        for block in self.transformer.layers:
            old = block.attn.cache
            old_slots, heads, old_length, dim = old.k.shape
            new = KVCache(slots, heads, length, dim, old.k.dtype, old.k.device)
            rows, keep = min(slots, old_slots), min(length, old_length)
            new.k[:rows, :, :keep] = old.k[:rows, :, :keep]
            new.v[:rows, :, :keep] = old.v[:rows, :, :keep]
            block.attn.cache = new
        self.cache_shape = (slots, length)

    def cache_bytes(self, slots: int | None = None, length: int | None = None) -> int:
        """Bytes of the KV cache now, or at `slots` x `length` in the same dtype."""
        if self.cache_shape == (0, 0):
            return 0
        caches = [block.attn.cache for block in self.transformer.layers]
        per_token = sum(2 * c.k[0, :, 0].numel() * c.k.element_size() for c in caches)
        rows, tokens = self.cache_shape
        return per_token * (slots or rows) * (length or tokens)

    @property
    def cache_slots(self) -> int:
        return self.cache_shape[0]

    @property
    def cache_length(self) -> int:
        return self.cache_shape[1]

    def drop_caches(self) -> None:
        for block in self.transformer.layers:
            block.attn.cache = None
        self.cache_shape = (0, 0)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits: through `lm_head` when there is one (untied, or a quantized tied head),
        else through the embedding matrix."""
        if "lm_head" in self._modules:
            return self.lm_head(h)
        return F.linear(h, self.transformer.token_embeddings.weight)

    def forward(self, tokens, positions, slots=None, span=None, last_only=False) -> torch.Tensor:
        """Logits for `tokens` [B, T] at `positions` [B, T], or with `last_only` for the
        last position only ([B, 1, vocab]: a prompt needs no others, and the output head
        is 15% of a 270M model's work per position).

        With `slots` [B], keys and values go to those cache rows and attention reads
        their first `span` positions (default: up to the furthest position, which reads it
        back from `positions`); without, attention is causal over `tokens` alone (scoring).
        Given `slots` and `span`, it reads no value back to the host, so a decode step can
        be captured as a CUDA graph (tested on the meta device). The serving paths around
        it (native plan, CUDA graphs) are runner.py's."""
        x = self.transformer.token_embeddings(tokens)
        cos = self.rope_cos[positions][:, None]
        sin = self.rope_sin[positions][:, None]
        B, T = tokens.shape
        if slots is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        elif span is None and B == T == 1:  # the cache row up to this token: nothing to mask
            span, mask = int(positions[0, 0]) + 1, None
        else:
            span = span or int(positions.max()) + 1
            mask = torch.arange(span, device=tokens.device)[None, None, None, :] <= positions[:, None, :, None]
        for block in self.transformer.layers:
            x = block(x, cos, sin, slots, positions, mask, span)
        return self.head(self.transformer.norm(x[:, -1:] if last_only else x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

