"""Sentence embeddings from a BERT encoder in the sentence-transformers layout.

A model directory holds the Hugging Face checkpoint (`config.json`, `model.safetensors`,
`tokenizer.json`) and sentence-transformers' description of what follows the encoder:
`modules.json` lists the modules (Transformer, Pooling, optionally Normalize),
`1_Pooling/config.json` (wherever modules.json points) chooses the pooling and
`sentence_bert_config.json` the longest input. Vectors match sentence-transformers' own.

Text and token ids are separate steps so that a caller can count tokens (usage, limits)
before it spends a forward pass, and can accept token arrays as input.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from elmd.engine.bert import Bert, load_bert
from elmd.engine.checkpoint import CheckpointError
from elmd.engine.quantize import quantize_encoder

# The concatenation order of sentence-transformers' Pooling for its legacy pooling_mode_* keys.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class InputTooLong(ValueError):
    """An input longer than the model takes, and the caller asked not to truncate."""

    def __init__(self, index: int, length: int, max_length: int):
        super().__init__(f"input {index} has {length} tokens, more than the model's maximum of {max_length}")
        self.index, self.length, self.max_length = index, length, max_length


class Embedder:
    """Text -> token ids -> one vector per input. Safe to call from several threads: tokenizing
    runs in parallel, forward passes take turns (each already uses every intra-op thread)."""

    def __init__(self, model: Bert, tokenizer: Tokenizer, *, pooling: Sequence[str], normalize: bool,
                 max_length: int, lowercase: bool = False, batch_size: int = 32):
        self.model, self.pooling, self.normalize = model, tuple(pooling), normalize
        self.max_length, self.lowercase, self.batch_size = max_length, lowercase, batch_size
        self.dimensions = model.cfg.hidden_size * len(self.pooling)
        self.pad_id = model.cfg.pad_token_id
        self._tokenizer = _without_padding(tokenizer)
        self._tokenizer.no_truncation()
        self._truncating = _without_padding(tokenizer)
        self._truncating.enable_truncation(max_length)
        self._forward_lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: str | Path, dtype: str | torch.dtype = "float32", quant: str = "none") -> "Embedder":
        """Load the model in `path`; `dtype` ("float32" or "bfloat16") is the weights' and the
        activations', the vectors are float32 either way; `quant` ("int8", "int4") quantizes
        the linear layers as the generators' are (elmd/engine/quantize.py)."""
        path = Path(path)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        model = quantize_encoder(load_bert(path, dtype), quant)
        pooling, normalize = read_modules(path)
        st_config = _read_json(path / "sentence_bert_config.json") or {}
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json in the model directory")
        max_length = min(st_config.get("max_seq_length") or model.cfg.max_position_embeddings,
                         model.cfg.max_position_embeddings)
        return cls(model, Tokenizer.from_file(str(tokenizer_file)), pooling=pooling, normalize=normalize,
                   max_length=max_length, lowercase=bool(st_config.get("do_lower_case")))

    def encode(self, texts: Sequence[str], truncate: bool = False) -> list[list[int]]:
        """Token ids of each text with the special tokens the model expects ([CLS] ... [SEP]);
        cut to `max_length` when `truncate`, else an over-long text raises InputTooLong."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        tokenizer = self._truncating if truncate else self._tokenizer
        ids = [e.ids for e in tokenizer.encode_batch(list(texts))]
        self.check(ids)
        return ids

    def check(self, token_id_lists: Sequence[Sequence[int]]) -> None:
        """Refuse inputs the network cannot take: too long, empty, or ids outside the vocabulary."""
        vocab = self.model.cfg.vocab_size
        for i, ids in enumerate(token_id_lists):
            if len(ids) > self.max_length:
                raise InputTooLong(i, len(ids), self.max_length)
            if not ids:
                raise ValueError(f"input {i} has no tokens")
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"input {i} has a token id outside the vocabulary (0..{vocab - 1})")

    @torch.inference_mode()
    def embed(self, token_id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """float32 [n, dimensions], one row per input in the given order. Inputs are batched
        by length (longest first) so that a batch pads little."""
        self.check(token_id_lists)
        out = torch.empty(len(token_id_lists), self.dimensions)
        order = sorted(range(len(token_id_lists)), key=lambda i: -len(token_id_lists[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._embed_batch([token_id_lists[i] for i in rows])
        return out

    def _embed_batch(self, batch: list[Sequence[int]]) -> torch.Tensor:
        lengths = torch.tensor([len(ids) for ids in batch])
        width = int(lengths.max())
        tokens = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(batch):
            tokens[row, : len(ids)] = torch.tensor(ids)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        with self._forward_lock:
            hidden = self.model(tokens, None if bool(mask.all()) else mask).float()
        vectors = torch.cat([pool(hidden, mask, lengths, mode) for mode in self.pooling], dim=-1)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors


def pool(hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per sequence from its token states [B, T, C], computed as
    sentence-transformers' Pooling does."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask[..., None], float("-inf")).max(dim=1).values
    total = (hidden * mask[..., None]).sum(dim=1)
    count = lengths[:, None].to(hidden.dtype)
    return total / (count if mode == "mean" else count.sqrt())


def read_modules(path: Path) -> tuple[tuple[str, ...], bool]:
    """(pooling modes, L2-normalise?) from modules.json and the Pooling module's config.
    Without modules.json (a plain BERT checkpoint) sentence-transformers mean-pools and
    does not normalise; any module besides Transformer, Pooling and Normalize is refused."""
    modules = _read_json(path / "modules.json")
    if modules is None:
        return ("mean",), False
    pooling: tuple[str, ...] | None = None
    normalize = False
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        elif kind == "Pooling":
            pooling = pooling_modes(_read_json(path / module.get("path", "") / "config.json") or {})
        elif kind == "Normalize":
            normalize = True
        else:
            raise CheckpointError(f"{path / 'modules.json'}: module {module.get('type')!r} is not supported")
    if pooling is None:
        raise CheckpointError(f"{path / 'modules.json'}: no Pooling module")
    return pooling, normalize


def pooling_modes(config: dict) -> tuple[str, ...]:
    """The Pooling config's modes, new style (`pooling_mode`: a name or a list) or legacy
    (`pooling_mode_*_tokens` flags); several modes are concatenated, none means mean."""
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(name for key, name in LEGACY_POOLING_KEYS.items() if config.get(key)) or ("mean",)
    unsupported = [m for m in modes if m not in POOLING_MODES]
    if unsupported:
        raise CheckpointError(f"pooling mode {unsupported[0]!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    if config.get("include_prompt") is False:
        raise CheckpointError("pooling that excludes the prompt (include_prompt: false) is not supported")
    return modes


def _without_padding(tokenizer: Tokenizer) -> Tokenizer:
    """A copy with no padding: tokenizer.json often pads to a fixed 128 that the batching replaces."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    return copy


def _read_json(path: Path):
    """The file's JSON, None when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
