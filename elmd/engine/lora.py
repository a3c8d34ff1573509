"""LoRA and DoRA adapters over a loaded OpenELM, in mlx-lm's and PEFT's formats.

An adapter is read once into one form for both backends: per adapted linear layer, the
low-rank pair A [r, in] and B [out, r] with the scale folded into B, so that a row's output
is `base(x) + B (A x)`; DoRA adds a magnitude m [out], giving `m / |W + B A| * (base(x) + B (A x))`
with |.| the norm of each output row of the adapted weight (mlx-lm's DoRALinear and PEFT's
`use_dora` both compute this; the base weight W dequantized for a quantized base, as they do).

The base weights are never merged: `AdapterSet` computes each adapter's delta for the rows
that use it (gather the rows, two small matmuls, add), so one batch mixes adapters and the
base over one copy of the (quantized) base weights, as QLoRA serving does. On the native plan
one kernel adds every row's delta in a fixed order per row (decode.cpp, add_adapters), so a
row's logits are bitwise the same alone or in any mix (tests/test_lora.py); elsewhere
(ATen, CUDA) the same sums run as forward hooks on the layers.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elmd.engine.openelm import OpenELM, OpenELMConfig

TARGETS = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")  # the order of the native plan's linears


# PEFT options that change what an adapter computes beyond B (A x): refused by name, not ignored.
PEFT_REFUSED = {
    "rank_pattern": "per-layer ranks", "alpha_pattern": "per-layer alphas", "fan_in_fan_out": "Conv1D weights",
    "lora_bias": "a trained bias on lora_B", "layer_replication": "replicated layers",
    "trainable_token_indices": "trained embedding rows", "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QALoRA's pooled inputs", "target_parameters": "adapted parameters of non-Linear modules",
    "use_bdlora": "block-diagonal LoRA",
}


class AdapterError(ValueError):
    """An adapter that cannot be served here; the message names the file and the key."""


@dataclass
class LayerDelta:
    a: torch.Tensor  # [r, in] float32
    b: torch.Tensor  # [out, r] float32, the adapter's scale folded in
    magnitude: torch.Tensor | None = None  # DoRA's m [out]


@dataclass
class Adapter:
    name: str
    directory: Path
    format: str  # "mlx" | "peft"
    kind: str  # "lora" | "dora"
    rank: int
    deltas: dict[tuple[int, str], LayerDelta] = field(default_factory=dict)  # (layer, target) -> delta

    @property
    def nbytes(self) -> int:
        tensors = [t for d in self.deltas.values() for t in (d.a, d.b, d.magnitude) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def layer_shapes(cfg: OpenELMConfig, layer: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each adaptable linear layer of `layer`."""
    q, kv, d, dim = cfg.num_query_heads[layer], cfg.num_kv_heads[layer], cfg.head_dim, cfg.model_dim
    ffn = cfg.ffn_dims[layer]
    return {"attn.qkv_proj": ((q + 2 * kv) * d, dim), "attn.out_proj": (dim, q * d),
            "ffn.proj_1": ((2 if cfg.ffn_with_glu else 1) * ffn, dim), "ffn.proj_2": (dim, ffn)}


def read_adapter(directory: str | Path, cfg: OpenELMConfig, name: str | None = None) -> Adapter:
    """An adapter folder in mlx-lm's layout (adapters.safetensors) or PEFT's (adapter_model.safetensors),
    checked against the base's config: AdapterError says what does not fit, naming the file and key."""
    directory = Path(directory)
    name = name or directory.name
    config_path = directory / "adapter_config.json"
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter folder")
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no adapter_config.json (mlx-lm's and PEFT's adapters have one)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    if (directory / "adapters.safetensors").is_file():
        return _read_mlx(directory, config, cfg, name)
    if (directory / "adapter_model.safetensors").is_file():
        return _read_peft(directory, config, cfg, name)
    raise AdapterError(f"{directory}: neither adapters.safetensors (mlx-lm) nor adapter_model.safetensors (PEFT)")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise AdapterError(f"{path}: cannot read safetensors ({e})") from None


def _number(config: dict, key: str, path: Path, kind=float):
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and value != int(value)):
        raise AdapterError(f"{path}: '{key}' must be a positive {'integer' if kind is int else 'number'}, not {value!r}")
    return kind(value)


def _read_mlx(directory: Path, config: dict, cfg: OpenELMConfig, name: str) -> Adapter:
    """mlx-lm's `mlx_lm.lora` output: lora_a [in, r], lora_b [r, out] per layer, `scale` applied after both."""
    path = directory / "adapter_config.json"
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise AdapterError(f"{path}: fine_tune_type {kind!r}: elmd serves lora and dora adapters (a full fine-tune "
                           "is a model of its own: elmd import it)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterError(f"{path}: 'lora_parameters' missing")
    rank = _number(params, "rank", path, int)
    if "scale" not in params:
        raise AdapterError(f"{path}: 'lora_parameters' has no 'scale' (mlx-lm's LoRA scale)")
    scale = float(params["scale"])
    keys = params.get("keys")
    if keys is not None:
        unknown = sorted(set(keys) - set(TARGETS))
        if unknown:
            raise AdapterError(f"{path}: lora_parameters.keys {unknown}: elmd adapts {', '.join(TARGETS)} only")
    deltas, weights_path = _read_deltas(directory, MLX_LAYOUT, kind, scale)
    return _checked(Adapter(name, directory, "mlx", kind, rank, deltas), cfg, weights_path)


def _read_peft(directory: Path, config: dict, cfg: OpenELMConfig, name: str) -> Adapter:
    """PEFT's `save_pretrained`: lora_A.weight [r, in], lora_B.weight [out, r], scaled by lora_alpha / r
    (lora_alpha / sqrt(r) with use_rslora)."""
    path = directory / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r}: elmd serves LORA adapters")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save {config['modules_to_save']}: full copies of layers beside the "
                           "adapter cannot be served over shared base weights; merge them into a model of its own")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias {config['bias']!r}: elmd serves adapters without trained biases")
    for key, what in PEFT_REFUSED.items():
        if config.get(key):
            raise AdapterError(f"{path}: '{key}' ({what}) is not served")
    rank = _number(config, "r", path, int)
    alpha = _number(config, "lora_alpha", path)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    kind = "dora" if config.get("use_dora") else "lora"
    deltas, weights_path = _read_deltas(directory, PEFT_LAYOUT, kind, scale)
    return _checked(Adapter(name, directory, "peft", kind, rank, deltas), cfg, weights_path)


@dataclass(frozen=True)
class Layout:
    """Where a format keeps an adapter's tensors: its file, the prefix of its keys, the names of A,
    B and DoRA's magnitude after a layer's key, and whether A and B are stored transposed."""

    file: str
    prefix: str
    a: str
    b: str
    magnitude: str
    transposed: bool


MLX_LAYOUT = Layout("adapters.safetensors", r"(?:model\.)?", "lora_a", "lora_b", "m", True)
PEFT_LAYOUT = Layout("adapter_model.safetensors", r"(?:base_model\.model\.)?", "lora_A.weight", "lora_B.weight",
                     "lora_magnitude_vector", False)
LAYOUTS = {"mlx": MLX_LAYOUT, "peft": PEFT_LAYOUT}  # by Adapter.format
LAYER_KEY = r"transformer\.layers\.(\d+)\.(attn\.qkv_proj|attn\.out_proj|ffn\.proj_1|ffn\.proj_2)"


def _read_deltas(directory: Path, layout: Layout, kind: str, scale: float) -> tuple[dict, Path]:
    """Every layer's delta in `layout`'s file (B times `scale`), and the file's path."""
    weights_path = directory / layout.file
    tensors = _load_tensors(weights_path)
    names = {layout.a: "a", layout.b: "b", layout.magnitude: "m", f"{layout.magnitude}.weight": "m"}
    pattern = re.compile(layout.prefix + LAYER_KEY + r"\.(" + "|".join(re.escape(n) for n in names) + ")")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            what = "an embedding or output head" if "embed" in key or "lm_head" in key else "no OpenELM linear layer"
            raise AdapterError(f"{weights_path}: tensor '{key}' adapts {what}; elmd adapts {', '.join(TARGETS)} only")
        parts.setdefault((int(match[1]), match[2]), {})[names[match[3]]] = tensor
    deltas = {}
    for (layer, target), p in sorted(parts.items()):
        where = f"{weights_path}: transformer.layers.{layer}.{target}"
        if "a" not in p or "b" not in p:
            raise AdapterError(f"{where}: needs both {layout.a} and {layout.b}")
        if kind == "dora" and "m" not in p:
            raise AdapterError(f"{where}: a dora adapter needs {layout.magnitude}")
        a, b = (p["a"].T, p["b"].T) if layout.transposed else (p["a"], p["b"])
        deltas[(layer, target)] = LayerDelta(a.contiguous(), (scale * b).contiguous(), p.get("m") if kind == "dora" else None)
    return deltas, weights_path


def _checked(adapter: Adapter, cfg: OpenELMConfig, weights_path: Path) -> Adapter:
    """Every delta fits the base's layer: an adapter trained on another OpenELM size fails here."""
    if not adapter.deltas:
        raise AdapterError(f"{weights_path}: no LoRA weights")
    for (layer, target), d in adapter.deltas.items():
        where = f"{weights_path}: transformer.layers.{layer}.{target}"
        if layer >= cfg.num_transformer_layers:
            raise AdapterError(f"{where}: the base has {cfg.num_transformer_layers} layers (an adapter for another model?)")
        out, inp = layer_shapes(cfg, layer)[target]
        r = d.a.shape[0]
        if d.a.dim() != 2 or d.b.dim() != 2 or d.a.shape[1] != inp or d.b.shape != (out, r):
            raise AdapterError(f"{where}: A {tuple(d.a.shape)} and B {tuple(d.b.shape)} do not fit the base's "
                               f"{out} x {inp} layer with one rank (an adapter for another model?)")
        if d.magnitude is not None and d.magnitude.shape != (out,):
            raise AdapterError(f"{where}: magnitude {tuple(d.magnitude.shape)} for {out} outputs")
    return adapter


def float_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight in float32, dequantized where it is stored quantized (DoRA's norm)."""
    from elmd.engine.quantize import QuantizedLinear

    if isinstance(module, QuantizedLinear):
        return module.scheme.dequantize(module.stored(), module.out_features, module.in_features).float()
    return module.weight.float()


@dataclass
class PreparedDelta:
    """A delta as the model runs it, in the model's dtype and device; `factor` DoRA's m / |W + B A|
    (None: LoRA)."""

    a: torch.Tensor
    b: torch.Tensor
    factor: torch.Tensor | None


class AdapterSet:
    """The adapters loaded on one model, by index (1, 2, ...; 0 is the base, and an index is
    never reused, so prefix-cache entries made under an unloaded adapter cannot be hit by
    another). A forward says which adapter each batch row uses (`rows`), the native plan per
    call; hooks on the linear layers run the ATen path."""

    def __init__(self):
        self.indexes: dict[str, int] = {}
        self.prepared: dict[int, dict[tuple[int, str], PreparedDelta]] = {}
        self._next = 1
        self._active: list[tuple[int, torch.Tensor | None]] = []  # (index, rows or None for all) of the forward running
        self._hooks: list = []

    def __bool__(self) -> bool:
        return bool(self.indexes)

    def add(self, adapter: Adapter, model: OpenELM) -> int:
        """Prepare `adapter` for `model`; its index."""
        layers = model.transformer.layers
        dtype, device = model.transformer.norm.weight.dtype, model.transformer.norm.weight.device
        prepared = {}
        for (layer, target), d in adapter.deltas.items():
            module = layers[layer].get_submodule(target)
            factor = None
            if d.magnitude is not None:
                adapted = float_weight(module).to(d.b.device) + d.b @ d.a
                factor = (d.magnitude / adapted.norm(dim=1)).to(dtype=dtype, device=device)
            prepared[(layer, target)] = PreparedDelta(d.a.to(dtype=dtype, device=device),
                                                      d.b.to(dtype=dtype, device=device), factor)
        index = self._next
        self._next += 1
        self.indexes[adapter.name] = index
        self.prepared[index] = prepared
        return index

    def remove(self, name: str) -> int:
        index = self.indexes.pop(name)
        del self.prepared[index]
        return index

    def plan_tensors(self, index: int, num_layers: int) -> tuple[list[torch.Tensor], ...]:
        """A, B transposed and factor per linear in the native plan's order (empty where not adapted)."""
        none = torch.empty(0)
        out: tuple[list, list, list] = ([], [], [])
        for layer in range(num_layers):
            for target in TARGETS:
                d = self.prepared[index].get((layer, target))
                tensors = (none, none, none) if d is None else (d.a, d.b.T.contiguous(), d.factor)
                for lst, t in zip(out, tensors):
                    lst.append(none if t is None else t)
        return out

    def attach(self, model: OpenELM) -> None:
        """(Re)install the hooks that apply the active adapters on `model`'s layers (after a load,
        or after the kernels switch and layers are swapped)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = [layers.get_submodule(target).register_forward_hook(self._hook(i, target))
                       for i, layers in enumerate(model.transformer.layers) for target in TARGETS]

    def _hook(self, layer: int, target: str):
        key = (layer, target)

        def apply(module, inputs, out):
            if not self._active:
                return None
            x = inputs[0]
            for index, rows in self._active:
                d = self.prepared[index].get(key)
                if d is None:
                    continue
                rows = None if rows is None else rows.to(x.device)
                xs, ys = (x, out) if rows is None else (x[rows], out[rows])
                ys = ys + F.linear(F.linear(xs, d.a), d.b)
                if d.factor is not None:
                    ys = ys * d.factor
                out = ys if rows is None else out.index_copy(0, rows, ys)
            return out

        return apply

    @contextlib.contextmanager
    def rows(self, indexes: list[int] | None):
        """Within: a forward of the model applies adapter `indexes[i]` to batch row i (0: none)."""
        self._active = groups(indexes)
        try:
            yield
        finally:
            self._active = []


def groups(indexes: list[int] | None) -> list[tuple[int, torch.Tensor | None]]:
    """(adapter, its rows) for each adapter in `indexes`; rows None when every row uses it."""
    if not indexes or not any(indexes):
        return []
    distinct = sorted(set(indexes) - {0})
    if len(distinct) == 1 and 0 not in indexes:
        return [(distinct[0], None)]
    return [(i, torch.tensor([r for r, v in enumerate(indexes) if v == i])) for i in distinct]
