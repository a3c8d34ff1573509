"""The MLX backend: mlx-lm's OpenELM and its continuous batching (`BatchGenerator`).

mlx-lm does the modelling, the batched KV cache and the join/leave bookkeeping; this
file loads the model (with our dtype and quantization) and answers the backend contract.
The worker thread that owns the model is elmd/engine/mlx_worker.py; each request's
penalties, constraints and seeded sampler are elmd/engine/mlx_sampling.py's. LoRA adapters
are read by elmd/engine/lora.py (as the PyTorch backend reads them) and applied with mlx-lm's
own LoRALinear and DoRALinear.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import load_model

from elmd.engine.checkpoint import read_config
from elmd.engine.grammar import TokenMatcher
from elmd.engine.lora import Adapter, LayerDelta, read_adapter
from elmd.engine.mlx_worker import BatchWorker, Variant
from elmd.engine.mlx_worker import Request as _Request  # the name MLXBackend.__init__ gives its jobs
from elmd.engine.prefix_cache import PrefixCache
from elmd.engine.protocol import BackendInfo, CacheBytes, SamplingParams, StepChannel, TokenLogprob, context_length
from elmd.quant import INT4_GROUP, Quant

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
GROUP_SIZE = INT4_GROUP["mlx"]  # a bare int4's group here (elmd.quant says why), and int8's


@dataclass(frozen=True)
class MLXQuant:
    """mlx-lm affine quantization: `bits` for the transformer's linear layers,
    `embedding_bits` for the tied embedding/output head (None: left in float)."""

    bits: int
    group_size: int = GROUP_SIZE
    embedding_bits: int | None = 8


def parse_quant(quant: str | Quant) -> MLXQuant | None:
    """A quantization (a name is parsed by Quant.parse: bare "int4" is group 64 here) -> mlx-lm's
    layout; "none" -> None. bf16 has no scheme here: MLX runs bf16 weights as --dtype bfloat16
    (the load plan says so)."""
    quant = Quant.parse(quant, "mlx")
    if quant.scheme not in ("none", "int8", "int4"):
        raise ValueError(f"quantization {quant} has no MLX scheme; choose none, int8 or int4 (int4-g32, -g64, -g128)")
    if quant.scheme == "none":
        return None
    return MLXQuant(8, GROUP_SIZE) if quant.scheme == "int8" else MLXQuant(4, quant.group)


class _QuantizedLinear(nn.QuantizedLinear):
    """Multiplies in fp32 and returns the activations' dtype. MLX's CPU kernel accumulates
    a bf16 quantized matmul in bf16: measured 12% relative error at 12,288 inputs (the 3B's
    widest FFN) and 8x slower than fp32, which is exact."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x.astype(mx.float32)).astype(x.dtype)


class _QuantizedEmbedding(nn.QuantizedEmbedding):
    """The tied output head, multiplied in fp32 like `_QuantizedLinear`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return super().as_linear(x.astype(mx.float32)).astype(x.dtype)


def quantize(model: nn.Module, spec: MLXQuant, fp32_accumulate: bool) -> None:
    """Quantize in place with mlx-lm's affine scheme. The model must already hold bf16 (or
    fp32) weights: the scales take their dtype, and with it the quantized matmuls' inputs
    (fp16 overflows on the 3B, whose 4/8-bit MLX conversions then emit only <unk>)."""
    linear, embedding = (_QuantizedLinear, _QuantizedEmbedding) if fp32_accumulate else (nn.QuantizedLinear, nn.QuantizedEmbedding)

    def quantized(path: str, module: nn.Module):
        if isinstance(module, nn.Linear) and module.weight.shape[-1] % spec.group_size == 0:
            return linear.from_linear(module, spec.group_size, spec.bits)
        if isinstance(module, nn.Embedding) and spec.embedding_bits and module.weight.shape[-1] % spec.group_size == 0:
            return embedding.from_embedding(module, spec.group_size, spec.embedding_bits)
        return module

    leaves = tree_map_with_path(quantized, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)


def load_mlx_model(model_dir: str | Path, dtype: str = "auto", quant: str | Quant | MLXQuant | None = "none") -> nn.Module:
    """mlx-lm's OpenELM with our dtype (bf16 by default: the 3B overflows fp16) and
    quantization (a name or Quant, or parsed already). Call it on the thread that will run the model."""
    spec = quant if quant is None or isinstance(quant, MLXQuant) else parse_quant(quant)
    model, _ = load_model(Path(model_dir))
    target = mx.bfloat16 if dtype == "auto" else DTYPES[dtype]
    if spec is not None and target == mx.float16:
        raise ValueError("quantized MLX models run in bfloat16 or float32: float16 overflows on OpenELM-3B")
    model.set_dtype(target)
    if spec is not None:
        quantize(model, spec, fp32_accumulate=mx.default_device() == mx.cpu)
    mx.eval(model.parameters())
    return model


def adapted_model(model: nn.Module, adapter: Adapter) -> tuple[nn.Module, int]:
    """`model` under `adapter`, and the bytes of the adapter's arrays. A second module tree over
    the same weight arrays: the root, the transformer, its layer list and each adapted block's
    attn and ffn are shallow copies (no array is copied), whose adapted linears are mlx-lm's
    LoRALinear or DoRALinear around the base's, quantized or not; `model` stays the base."""
    dtype = model.transformer.norm.weight.dtype
    adapted = copy.copy(model)
    adapted.transformer = copy.copy(model.transformer)
    blocks = adapted.transformer.layers = list(model.transformer.layers)
    for layer in {layer for layer, _ in adapter.deltas}:
        block = blocks[layer] = copy.copy(blocks[layer])
        block.attn, block.ffn = copy.copy(block.attn), copy.copy(block.ffn)
    nbytes = 0
    for (layer, target), delta in adapter.deltas.items():
        part, name = target.split(".")
        owner = getattr(blocks[layer], part)
        linear = _adapted_linear(getattr(owner, name), delta, dtype)
        setattr(owner, name, linear)
        arrays = [linear[key] for key in ("lora_a", "lora_b", "m") if key in linear]
        mx.eval(arrays)
        nbytes += sum(a.nbytes for a in arrays)
    return adapted, nbytes


def _adapted_linear(linear: nn.Module, delta: LayerDelta, dtype: mx.Dtype) -> nn.Module:
    """mlx-lm's layer over `linear` with scale 1 (lora.py folds the scale into B); DoRA's
    magnitude in float32, as DoRALinear computes its own."""
    adapted = (LoRALinear if delta.magnitude is None else DoRALinear).from_base(linear, r=delta.a.shape[0], scale=1.0)
    adapted.lora_a = mx.array(delta.a.T.contiguous().numpy()).astype(dtype)
    adapted.lora_b = mx.array(delta.b.T.contiguous().numpy()).astype(dtype)
    if delta.magnitude is not None:
        adapted.m = mx.array(delta.magnitude.numpy())
    return adapted


def _cache_bytes(cache: list) -> int:
    return sum(layer.nbytes for layer in cache)


class MLXBackend(BatchWorker):
    def __init__(self, model_dir: str | Path, dtype: str = "auto", quant: str | Quant = "none", max_batch: int = 32,
                 prefix_cache_bytes: int = 256 << 20):
        """`prefix_cache_bytes`: keys and values of finished requests kept for prompts that
        start with them (a chat's next turn), as the PyTorch backend keeps them; 0: off."""
        self._model_dir = model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        quant = Quant.parse(quant, "mlx")  # an unknown name is refused here, before the worker starts
        spec = parse_quant(quant)
        self._max_batch = max_batch
        self._prefix = PrefixCache(prefix_cache_bytes, size=_cache_bytes)
        self._kv_bytes = 0  # the KV cache's size after the last step, kept by the worker
        self._cache_budget: Callable[[], int | None] = lambda: None
        self._vocab_size = config["vocab_size"]
        self._adapters: dict[str, int] = {}  # name -> its variant's space; changed on the worker
        self._next_space = 1
        self._jobs: queue.SimpleQueue[_Request | Callable[[], None] | None] = queue.SimpleQueue()
        loaded: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, args=(model_dir, dtype, spec, loaded), name="elmd-mlx", daemon=True)
        self._thread.start()
        error = loaded.get()
        if error is not None:
            raise error
        self.info = BackendInfo(
            name="mlx",
            device="mlx-" + ("gpu" if mx.default_device() == mx.gpu else "cpu"),
            dtype=str(self.model.transformer.norm.weight.dtype).removeprefix("mlx.core."),
            quant=str(quant),
            context_length=context_length(config),
            vocab_size=self._vocab_size,
            memory_bytes=sum(v.nbytes for _, v in nn.utils.tree_flatten(self.model.parameters())),
            extra={"max_batch": max_batch, "prefix_cache_bytes": prefix_cache_bytes},
        )

    def _work(self, model_dir: Path, dtype: str, spec: MLXQuant | None, loaded: queue.SimpleQueue) -> None:
        try:
            self.model = load_mlx_model(model_dir, dtype, spec)
            self._stream = mx.new_stream(mx.default_device())
            self._variants = {0: Variant(self.model, self._new_generator(self.model))}
        except Exception as e:
            loaded.put(e)
            return
        loaded.put(None)
        self._serve()

    # ---- the contract ---------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
               matcher: TokenMatcher | None = None, adapter: str | None = None) -> StepChannel:
        self._check_open()
        space = self._space(adapter)
        channel = StepChannel()  # prompt and max_tokens fit the context: Engine.check_length saw to it
        self._jobs.put(_Request(channel, params, list(prompt_ids), frozenset(stop_ids), matcher, adapter=space))
        return channel

    def score(self, token_ids: list[int], top_n: int, adapter: str | None = None) -> list[TokenLogprob]:
        if len(token_ids) < 2:
            return []
        return self._on_worker(lambda: self._score(self._variants[self._space(adapter)].model, token_ids, top_n))

    def load_adapter(self, name: str, directory: Path) -> int:
        """Read the LoRA adapter in `directory` (mlx-lm's or PEFT's layout) and serve it as `name`
        over the base's arrays, unmerged; the bytes it takes. AdapterError when it does not fit
        this model. A name loaded already is replaced, unless a request still uses it (ValueError)."""
        adapter = read_adapter(directory, read_config(self._model_dir), name)

        def load() -> int:
            model, nbytes = adapted_model(self.model, adapter)
            if name in self._adapters and not self._remove_variant(self._adapters[name]):
                raise ValueError(f"adapter {name!r} is loaded and in use; load it again when its requests end")
            self._adapters[name] = self._add_variant(model)
            return nbytes

        return self._on_worker(load)

    def unload_adapter(self, name: str) -> bool:
        """Drop adapter `name` and its cached prefixes, unless a request still uses it (False)."""

        def unload() -> bool:
            space = self._adapters.get(name)
            if space is None:
                return True
            if not self._remove_variant(space):
                return False
            del self._adapters[name]
            return True

        return self._on_worker(unload)

    def _space(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        space = self._adapters.get(adapter)
        if space is None:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        return space

    def cache_bytes(self) -> CacheBytes:
        # Sizes kept by the worker: never waits for a step (the memory budget of another
        # model's worker reads it).
        return CacheBytes(kv_cache=self._kv_bytes, prefix_cache=self._prefix.bytes)

    def speculated_tokens(self) -> tuple[int, int]:
        return 0, 0  # MLX does not speculate yet

    def limit_cache(self, budget: Callable[[], int | None]) -> None:
        """`budget()`: bytes the KV cache and cached prefixes may take now; prefixes are
        dropped first, and past it new requests are refused."""
        self._cache_budget = budget

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self.model = None
