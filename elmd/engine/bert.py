"""BERT in PyTorch: the encoder behind sentence-embedding models (all-MiniLM, bge, ...).

One file, like openelm.py. Module names follow the Hugging Face checkpoint
(`embeddings.word_embeddings.weight`, `encoder.layer.N.attention.self.query.weight`, ...),
so loading is a plain state dict; a `bert.` prefix on every name is accepted and the pooler
is ignored (sentence-transformers pools the token states itself). No KV cache: an
embedding is one bidirectional pass over a batch, its padding left out (Packing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elmd.engine.checkpoint import CheckpointError, expected_shapes, iter_tensors, weight_files

CHECKPOINT_PREFIX = "bert."


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """From config.json; refuses what this network would compute differently (RoBERTa's
        offset positions, relative position embeddings, other activations)."""
        if d.get("model_type") != "bert":
            raise ValueError(f"unsupported model_type {d.get('model_type')!r}: embedding models must be 'bert'")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if cfg.hidden_act != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}: only 'gelu' (erf) is implemented")
        if cfg.position_embedding_type != "absolute":
            raise ValueError(f"unsupported position_embedding_type {cfg.position_embedding_type!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads")
        return cfg


def uninitialized_embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding that skips its N(0, 1) init: the weights always come from a checkpoint, and on
    the meta device that init imports torch._refs (about a second; see openelm.Transformer)."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = uninitialized_embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = uninitialized_embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = uninitialized_embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Single-segment input: every token has type 0; `positions` count from 0 in each sequence."""
        x = self.word_embeddings(tokens) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, batch: "Packing") -> torch.Tensor:
        return batch.attend(self.query(x), self.key(x), self.value(x), self.heads)


class DenseResidualNorm(nn.Module):
    """BERT's `dense -> + residual -> LayerNorm`, after attention and after the MLP."""

    def __init__(self, width: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseResidualNorm(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, batch: "Packing") -> torch.Tensor:
        return self.output(self.self(x, batch), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseResidualNorm(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, batch: "Packing") -> torch.Tensor:
        h = self.attention(x, batch)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, T, hidden] of `tokens` [B, T] (zeros at padding); `attention_mask`
        [B, T] (bool) marks the real tokens of a right-padded batch, None when nothing is padding."""
        batch = Packing(tokens.shape, attention_mask)
        positions = torch.arange(tokens.shape[1]).expand(tokens.shape).reshape(-1)
        x = self.embeddings(batch.pack(tokens.reshape(-1)), batch.pack(positions))
        for layer in self.encoder.layer:
            x = layer(x, batch)
        return batch.pad(x).view(*tokens.shape, -1)


class Packing:
    """A right-padded batch run without its padding: every layer works on the real tokens
    alone, packed into one [tokens, C] matrix (a batch of short and long inputs costs its
    tokens, not batch x longest), and attention runs per sequence on its own span. So each
    sequence is computed as it would be alone: no mask, no padded row in any reduction (with
    int8 layers a padded batch's ~1e-7 differences in attention became 3e-3 in the vector)."""

    def __init__(self, shape: torch.Size, attention_mask: torch.Tensor | None):
        self.shape = shape
        batch, width = shape
        lengths = [width] * batch if attention_mask is None else attention_mask.sum(dim=1).tolist()
        starts = [0]
        for length in lengths[:-1]:
            starts.append(starts[-1] + length)
        self.spans = list(zip(starts, lengths))
        padded = attention_mask is not None and not bool(attention_mask.all())
        self.real = attention_mask.reshape(-1).nonzero().squeeze(1) if padded else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B*T, ...] -> [tokens, ...]"""
        return x if self.real is None else x.index_select(0, self.real)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> [B*T, ...], zeros at padding."""
        if self.real is None:
            return x
        return x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:]).index_copy_(0, self.real, x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """Bidirectional attention of each sequence over its own tokens: packed [tokens, C] in and out."""
        C = q.shape[-1]

        def heads_first(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
            return t[start : start + length].view(1, length, heads, C // heads).transpose(1, 2)

        out = [F.scaled_dot_product_attention(*(heads_first(t, start, length) for t in (q, k, v)))
               .transpose(1, 2).reshape(length, C) for start, length in self.spans]
        return out[0] if len(out) == 1 else torch.cat(out)


def read_bert_config(model_dir: Path) -> BertConfig:
    path = Path(model_dir) / "config.json"
    try:
        return BertConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json in the model directory") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_bert(model_dir: Path, dtype: torch.dtype = torch.float32) -> Bert:
    """Build the network from config.json and fill it from the safetensors weights, on the CPU."""
    model_dir = Path(model_dir)
    cfg = read_bert_config(model_dir)
    with torch.device("meta"):
        model = Bert(cfg)
    prefixed = CHECKPOINT_PREFIX + "embeddings.word_embeddings.weight" in weight_files(model_dir)
    prefix = CHECKPOINT_PREFIX if prefixed else ""
    wanted = {prefix + name: shape for name, shape in expected_shapes(model).items()}
    state = {name.removeprefix(prefix): tensor.to(dtype) for name, tensor in iter_tensors(model_dir, wanted)}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
