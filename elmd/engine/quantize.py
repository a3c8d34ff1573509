"""Weight-only quantization for the PyTorch backend: int8 per output channel, int4 per group.

One handler per scheme with two verbs (gpt-fast's shape): `quantize` turns a float weight
into the tensors stored on disk, and `QuantizedLinear` / `QuantizedEmbedding` run them.
The model file knows nothing about this: `quantize_model` swaps its `nn.Linear` modules
(and the tied embedding/head, optionally) in place.

The stored layout is the one the native VNNI kernels read (elmd/engine/kernels), so on
x86 CPUs with AVX512-VNNI a quantized model runs straight from the loaded tensors. Elsewhere
(no compiler, another CPU, CUDA, MPS) the same tensors are converted once to ATen's int8/int4
CPU kernels or, off the CPU, dequantized per call. Layers whose shape a scheme cannot
split (rows not a multiple of 16, inputs not a multiple of the group) stay in float.

Measured on a 2-core AVX512 machine (benchmarks/matmul_speed.py, 270M shapes, batch 1), the
native kernels stream weights at close to the machine's read bandwidth, ATen's at about half.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elmd.engine.kernels import native
from elmd.quant import Quant

METADATA_KEY = "elmd.quant"


@dataclass(frozen=True)
class QuantSpec:
    """A quantization: the scheme, its group size (int4), whether the tied embedding/head is
    quantized, and the scheme of the output head where it differs from the layers' ("" when not)."""

    scheme: str
    group_size: int = 0
    embedding: bool = False
    head: str = ""

    @property
    def name(self) -> str:
        return f"int4-g{self.group_size}" if self.scheme == "int4" else self.scheme

    @property
    def head_spec(self) -> "QuantSpec":
        """The output head's (and the tied embedding's) quantization."""
        return QuantSpec(self.head, 0, self.embedding) if self.head else self

    def to_json(self) -> str:
        return json.dumps({"scheme": self.scheme, "group_size": self.group_size, "embedding": self.embedding,
                           "head": self.head})

    @classmethod
    def from_json(cls, text: str) -> "QuantSpec":
        return cls(**json.loads(text))


def parse_quant(quant: str | Quant | QuantSpec, embedding: bool = False) -> QuantSpec | None:
    """A quantization (a name is parsed by Quant.parse: bare "int4" is group 32 here) -> how
    this backend lays it out; "none" -> None.

    int4 keeps the output head (and the tied embedding) at int8, as MLX's 4-bit models and
    llama.cpp's Q4 files (Q6_K/Q8_0 heads) do: on SmolLM2-135M's real weights an int4 head
    alone cost +7.4% perplexity against float, an int8 one -1.0% (int4 layers alike).

    "bf16" stores only the linear layers' weights in bf16 while the model (embedding, norms,
    activations, KV cache) stays in its own dtype: half of float32's bytes to stream per token
    without rounding the activations."""
    if isinstance(quant, QuantSpec):
        return quant
    quant = Quant.parse(quant, "torch")
    if quant.scheme == "none":
        return None
    if quant.scheme == "bf16":
        return QuantSpec("bf16", 0, False)
    if quant.scheme == "int8":
        return QuantSpec("int8", 0, embedding)
    return QuantSpec("int4", quant.group, embedding, head="int8")


def _flat(matmul2d):
    """ATen's weight-only kernels take 2-D activations only."""

    def matmul(x: torch.Tensor) -> torch.Tensor:
        out = matmul2d(x.reshape(-1, x.shape[-1]))
        return out.view(*x.shape[:-1], out.shape[-1])

    return matmul


class Int8Scheme:
    """Symmetric int8 per output channel: w = scale[n] * q[n, k]."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def fits(self, out_features: int, in_features: int) -> bool:
        return native.supports(out_features, in_features)

    def empty(self, n: int, k: int, device=None) -> dict[str, torch.Tensor]:
        return {"weight": torch.empty(n * k, dtype=torch.uint8, device=device),
                "scale": torch.empty(n, dtype=torch.float32, device=device)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-10) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"weight": native.pack_int8(q), "scale": scale}

    def dequantize(self, t: dict[str, torch.Tensor], n: int, k: int, rows=None) -> torch.Tensor:
        """The float weight, or only `rows` of it (an embedding lookup)."""
        if rows is None:
            return native.unpack_int8(t["weight"], n, k).float() * t["scale"][:, None]
        return native.int8_rows(t["weight"], n, k, rows).float() * t["scale"][rows, None]

    def aten_kernel(self, t, n, k):
        """ATen's CPU int8 kernel in bf16, as its int4 kernel: it vectorizes bf16 activations
        only, and ran float32 ones 6.7x slower (270M shapes, one thread: 204 vs 31 ms a token)."""
        q = native.unpack_int8(t["weight"], n, k).contiguous()
        scale = t["scale"].to(torch.bfloat16)
        return _flat(lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale).to(x.dtype))

    def native_kernel(self, t, lib):
        return lambda x: lib.int8_linear(x, t["weight"], t["scale"])


class Int4Scheme:
    """Asymmetric int4 per group of `group_size` inputs: w = scale[n, g] * (q[n, k] - 8) + zero[n, g]."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.group = spec.group_size

    def fits(self, out_features: int, in_features: int) -> bool:
        return native.supports(out_features, in_features, self.group)

    def empty(self, n: int, k: int, device=None) -> dict[str, torch.Tensor]:
        groups = (n // native.ROWS, k // self.group, native.ROWS)
        return {"weight": torch.empty(n * k // 2, dtype=torch.uint8, device=device),
                "scale": torch.empty(groups, dtype=torch.float16, device=device),
                "zero": torch.empty(groups, dtype=torch.float16, device=device)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = w.shape
        wg = w.detach().float().reshape(n, k // self.group, self.group)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-6).half()  # fp16 as stored, so q is rounded against it
        zero = (lo + 8 * scale.float()).half()
        q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        return {"weight": native.pack_int4(q.to(torch.uint8).reshape(n, k)),
                "scale": native.pack_groups(scale), "zero": native.pack_groups(zero)}

    def dequantize(self, t: dict[str, torch.Tensor], n: int, k: int, rows=None) -> torch.Tensor:
        """The float weight, or only `rows` of it (an embedding lookup)."""
        if rows is None:
            q = native.unpack_int4(t["weight"], n, k)
            scale, zero = native.unpack_groups(t["scale"]), native.unpack_groups(t["zero"])
        else:
            q = native.int4_rows(t["weight"], n, k, rows)
            scale, zero = native.group_rows(t["scale"], rows), native.group_rows(t["zero"], rows)
        q = q.view(q.shape[0], k // self.group, self.group).float() - 8
        return (q * scale.float()[..., None] + zero.float()[..., None]).view(q.shape[0], k)

    def aten_kernel(self, t, n, k):
        q = native.unpack_int4(t["weight"], n, k).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([native.unpack_groups(t["scale"]).t(), native.unpack_groups(t["zero"]).t()], dim=-1)
        # ATen's CPU int4 kernel takes bf16 activations with bf16 scales and zeros.
        sz = sz.to(torch.bfloat16).contiguous()
        group = self.group
        return _flat(lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, sz).to(x.dtype))

    def native_kernel(self, t, lib):
        group = self.group
        return lambda x: lib.int4_linear(x, t["weight"], t["scale"], t["zero"], group)


class BF16Scheme:
    """bf16 weights for the linear layers; runs as BF16Linear, not QuantizedLinear."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def fits(self, out_features: int, in_features: int) -> bool:
        return native.supports_float(out_features, in_features)


def scheme_for(spec: QuantSpec):
    return {"bf16": BF16Scheme, "int8": Int8Scheme, "int4": Int4Scheme}[spec.scheme](spec)


class QuantizedLinear(nn.Module):
    """A bias-free linear layer whose weight is stored quantized (buffers in the on-disk layout)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.scheme = scheme_for(spec)
        for name, tensor in self.scheme.empty(out_features, in_features, device).items():
            self.register_buffer(name, tensor)
        self._kernel = None

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, spec, device="meta")
        for name, tensor in module.scheme.quantize(linear.weight).items():
            setattr(module, name, tensor.to(linear.weight.device))
        return module

    def stored(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def prepare(self, kernel: str = "auto") -> str:
        """Pick the kernel for where the tensors live ("auto"), or force "native", "aten" or
        "dequantize"; returns the kernel's name."""
        t, n, k = self.stored(), self.out_features, self.in_features
        on_cpu = self.weight.device.type == "cpu"
        if kernel == "auto":
            kernel = "dequantize" if not on_cpu else "native" if native.ops() is not None else "aten"
        if kernel == "native":
            lib = native.ops()
            if lib is None or not on_cpu:
                raise RuntimeError(f"the native kernels do not run here: {native.kernel_path()[1]}")
            self._kernel = self.scheme.native_kernel(t, lib)
        elif kernel == "aten":
            self._kernel = self.scheme.aten_kernel(t, n, k)
        elif kernel == "dequantize":
            self._kernel = lambda x: F.linear(x, self.scheme.dequantize(t, n, k).to(x.dtype))
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
        return kernel

    def _apply(self, fn, recurse=True):  # .to(device) moves the buffers: choose the kernel again
        result = super()._apply(fn, recurse)
        self._kernel = None
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self.prepare()
        return self._kernel(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.spec.name}"


class QuantizedBiasedLinear(nn.Module):
    """A QuantizedLinear plus its float bias (BERT's layers have one; OpenELM's do not)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec):
        super().__init__()
        self.quantized = QuantizedLinear.from_float(linear, spec)
        self.register_buffer("bias", linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x) + self.bias


class QuantizedEmbedding(nn.Module):
    """The tied token embedding, read from the output head's quantized weight: only the
    looked-up rows are dequantized. The head is held but not registered as a submodule,
    so its buffers appear once in the state dict (under the head's own name)."""

    def __init__(self, head: QuantizedLinear, dtype: torch.dtype):
        super().__init__()
        object.__setattr__(self, "head", head)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head
        rows = h.scheme.dequantize(h.stored(), h.out_features, h.in_features, rows=ids.reshape(-1))
        return rows.to(self.dtype).view(*ids.shape, h.in_features)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to the quantized head"


class BF16Linear(nn.Linear):
    """nn.Linear with bf16 weights. On a CPU with the native kernels, their float_linear
    takes it for any number of rows with one reduction order per output (batch invariant):
    it streams the weights for a decode step (about 3x F.linear's bf16 rate) and runs prompts
    as a tiled matmul (0.8-1.1x oneDNN's bf16 matmul); with AVX512-BF16 it rounds the input
    to bf16 and uses VDPBF16PS, as llama.cpp and oneDNN do for bf16 weights, elsewhere it
    widens the weights. Without the kernels F.linear in bf16. Same parameter name, same
    state dict."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor | None = None) -> "BF16Linear":
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        module.weight = nn.Parameter(linear.weight.to(torch.bfloat16) if weight is None else weight,
                                     requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float32) and self.weight.device.type == "cpu" and native.ops() is not None:
            return torch.ops.elmd.float_linear(x, self.weight)
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def native_linear_args(module: nn.Module) -> tuple[int, list[torch.Tensor], int] | None:
    """How the native plan (kernels/decode.cpp, PlanLinear) runs this linear layer:
    (kind, [weight, scale, zero], group), or None when it runs on a kernel the plan lacks."""
    none = torch.empty(0)
    if (type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.float32
            and native.supports_float(*module.weight.shape)):
        return 0, [module.weight, none, none], 0
    if isinstance(module, BF16Linear):
        return 1, [module.weight, none, none], 0
    if isinstance(module, QuantizedLinear) and module.weight.device.type == "cpu":
        t = module.stored()
        if module.spec.scheme == "int8":
            return 2, [t["weight"], t["scale"], none], 0
        if module.spec.scheme == "int4":
            return 3, [t["weight"], t["scale"], t["zero"]], module.spec.group_size
    return None


def choose_kernels_again(model: nn.Module) -> None:
    """Pick every layer's kernel anew, as a load would now: after the native kernels finish
    building, layers prepared on ATen's kernels move to them."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module._kernel = None
    if getattr(model, "quant_spec", None) is None:
        _use_native_bf16(model)


def _use_native_bf16(model: nn.Module) -> nn.Module:
    if native.ops() is None:
        return model
    for parent, name, linear in _linears(model):
        w = linear.weight
        if w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() and native.supports_float(*w.shape):
            setattr(parent, name, BF16Linear.from_linear(linear, weight=w))
    return model


def _linears(model: nn.Module, with_bias: bool = False) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, layer) of every plain nn.Linear: the bias-free ones (OpenELM's), or all."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and (with_bias or child.bias is None)]


def _swap(model: nn.Module, spec: QuantSpec, make) -> nn.Module:
    """Replace every bias-free nn.Linear that the scheme fits (and, with spec.embedding, the
    tied embedding/head, by spec.head_spec) by make(linear, spec) -> QuantizedLinear."""
    for parent, name, linear in _linears(model):
        is_head = parent is model and name == "lm_head"
        if is_head and not spec.embedding:
            continue  # the output head is quantized only with the embedding (spec.embedding)
        own = spec.head_spec if is_head else spec
        if scheme_for(own).fits(linear.out_features, linear.in_features):
            setattr(parent, name, make(linear, own))
    if spec.embedding and spec.scheme != "bf16":
        embedding = model.transformer.token_embeddings
        if "lm_head" in model._modules or not scheme_for(spec.head_spec).fits(embedding.num_embeddings, embedding.embedding_dim):
            return model  # an untied head was swapped above as a plain linear; or the shape does not fit
        head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
        head.weight = embedding.weight
        model.lm_head = make(head, spec.head_spec)
        model.transformer.token_embeddings = QuantizedEmbedding(model.lm_head, embedding.weight.dtype)
    return model


def quantize_model(model: nn.Module, quant: str | QuantSpec, embedding: bool = False) -> nn.Module:
    """Quantize `model`'s weights in place; returns the model. With "none" the weights stay
    as they are, but bf16 layers on a CPU with the native kernels decode through them.

    With `embedding`, the tied token embedding is quantized too: `model.lm_head` becomes a
    QuantizedLinear and `transformer.token_embeddings` reads its rows. The model's output
    head must then go through `model.lm_head` (when it has one), not the embedding weight.
    """
    spec = parse_quant(quant, embedding)
    if spec is None:
        return _use_native_bf16(model)
    if spec.scheme == "bf16":
        model = _swap(model, spec, lambda linear, own: BF16Linear.from_linear(linear))
    else:
        model = _swap(model, spec, QuantizedLinear.from_float)
    model.quant_spec = spec
    return model


def quantize_encoder(model: nn.Module, quant: str | Quant) -> nn.Module:
    """Quantize every linear layer of a sentence encoder (elmd/engine/bert.py) in place, from
    its float weights at load (the store keeps the float checkpoint: a 22M-parameter encoder
    quantizes in well under a second). Embeddings and norms stay float; "bf16" is the
    encoder's dtype instead (Embedder.from_dir), so it is refused here."""
    spec = parse_quant(quant)
    if spec is None:
        return model
    if spec.scheme == "bf16":
        raise ValueError("an embedding model takes bf16 as its dtype (--dtype bfloat16), not as a quant")
    for parent, name, linear in _linears(model, with_bias=True):
        if scheme_for(spec).fits(linear.out_features, linear.in_features):
            setattr(parent, name, QuantizedBiasedLinear(linear, spec) if linear.bias is not None
                    else QuantizedLinear.from_float(linear, spec))
    model.quant_spec = spec
    return model


FORMAT_KEY = "elmd.format"
FORMAT = "2"  # float tensors in float32, layers quantized from float32: one file for every dtype


def quantized_metadata(spec: QuantSpec) -> dict[str, str]:
    """The safetensors metadata of a stored quantized model."""
    return {METADATA_KEY: spec.to_json(), FORMAT_KEY: FORMAT}


def stored_spec(path: str | Path) -> QuantSpec | None:
    """The quantization of a stored file in the current format; None when there is no such
    file, or it is of an older format (bf16 norms from a bf16 load) and must be written again."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get(FORMAT_KEY) != FORMAT or METADATA_KEY not in metadata:
        return None
    return QuantSpec.from_json(metadata[METADATA_KEY])


def _stored_as_is(model: nn.Module) -> set[str]:
    """State-dict names of the quantized and bf16 layers, whose dtypes the scheme fixes."""
    return {f"{owner}.{name}" for owner, module in model.named_modules()
            if isinstance(module, (QuantizedLinear, BF16Linear)) for name in module.state_dict()}


def fill_quantized(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Fill a skeleton from empty_quantized with stored tensors: quantized layers as stored,
    every other float tensor in the activation `dtype`."""
    fixed = _stored_as_is(model)
    state = {name: t if name in fixed or not t.is_floating_point() else t.to(device=device, dtype=dtype)
             for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    embedding = model.transformer.token_embeddings
    if isinstance(embedding, QuantizedEmbedding):
        embedding.dtype = dtype
    return model


def empty_quantized(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap in quantized modules with unfilled (meta) tensors: the skeleton fill_quantized fills."""
    if spec.scheme == "bf16":
        model = _swap(model, spec, lambda linear, own: BF16Linear.from_linear(linear, torch.empty_like(linear.weight, dtype=torch.bfloat16, device="meta")))
    else:
        model = _swap(model, spec, lambda linear, own: QuantizedLinear(linear.in_features, linear.out_features, own, "meta"))
    model.quant_spec = spec
    return model
