"""The PyTorch backend: OpenELM on CPU, CUDA or MPS, with continuous batching."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

from elmd.engine.checkpoint import load_model, read_config
from elmd.engine.openelm import OpenELM
from elmd.engine.protocol import BackendInfo, SamplingParams, StepChannel, TokenLogprob
from elmd.engine.sampling import logprob_of
from elmd.engine.scheduler import Scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str, model_dim: int) -> torch.dtype:
    """`auto`: bf16 on accelerators; fp32 on the CPU, where bf16 activations drift enough to
    flip greedy answers of small models (SmolLM2-135M: "The" and "L" tie at 25.25 in bf16,
    25.36 vs 25.26 in fp32) and ATen's bf16 matmuls are no faster. fp16 only where the
    model cannot overflow it (OpenELM-3B's activations exceed fp16's range)."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    if dtype == "float16" and model_dim >= 3072:
        raise ValueError("float16 overflows in OpenELM-3B-sized models; use bfloat16 or float32")
    return DTYPES[dtype]


def pick_kv_cache_dtype(kv_cache_dtype: str, model: OpenELM) -> torch.dtype | None:
    """`auto`: float16 where the native plan runs a float32 model, as llama.cpp's default f16
    cache: half the cache's memory, and of the bytes a long context's decode step reads (270M
    int4 after 1,800 tokens: 94 -> 112 tok/s; logits within 5e-4 relative of a float32 cache
    on SmolLM2's real weights). Elsewhere the model's dtype (None)."""
    if kv_cache_dtype == "auto":
        return torch.float16 if model.native_plan is not None else None
    if kv_cache_dtype not in ("float16", "float32"):
        raise ValueError(f"unknown KV cache dtype {kv_cache_dtype!r}; choose auto, float16 or float32")
    return DTYPES[kv_cache_dtype]


def set_threads() -> None:
    """One intra-op thread per physical core: hyper-threads only contend for the same
    memory bandwidth that batch-1 decode is bound by."""
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    torch.set_num_threads(cores)


def stored_quant_path(model_dir: Path, quant: str) -> Path:
    """Where a model's weights quantized as `quant` are kept, beside the originals (a name
    that mlx-lm's `model*.safetensors` glob does not pick up)."""
    return model_dir / f"elmd-{quant}.safetensors"


def load_quantized_model(model_dir: Path, quant: str, dtype: torch.dtype, device: str) -> OpenELM:
    """Load the weights quantized as `quant`: from the stored quantized file when there is
    one, else quantize the float weights and store the result (when the directory is
    writable) so the next load skips quantizing."""
    from elmd.engine.quantize import load_quantized, parse_quant, quant_of, quantize_model, save_quantized

    spec = parse_quant(quant, embedding=True)
    stored = stored_quant_path(model_dir, quant)
    if spec is not None and stored.exists() and quant_of(stored) == spec:
        with torch.device("meta"):
            model = OpenELM(read_config(model_dir))
        model = load_quantized(model, stored, device)
        model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)  # built on the CPU
        return model.eval().requires_grad_(False)
    model = quantize_model(load_model(model_dir, dtype=dtype, device=device), quant, embedding=True)
    if spec is not None and os.access(model_dir, os.W_OK):
        partial = stored.with_suffix(".partial")
        save_quantized(model, partial)
        os.replace(partial, stored)
    return model


def use_native_plan(model: OpenELM) -> bool:
    """Run cached forwards (decode steps, one sequence's prompt chunks) through the native
    plan where it applies: a float32 model on an x86 CPU that built the kernels, every
    linear layer on a kernel the plan runs."""
    from elmd.engine.kernels import native
    from elmd.engine.quantize import native_linear_args

    norm = model.transformer.norm.weight
    if norm.device.type != "cpu" or norm.dtype != torch.float32 or native.load() is None:
        return False
    layers = model.transformer.layers
    linears = [m for b in layers for m in (b.attn.qkv_proj, b.attn.out_proj, b.ffn.proj_1, b.ffn.proj_2)]
    args = [native_linear_args(m) for m in linears]
    if any(a is None for a in args):
        return False
    none = torch.empty(0)

    def layer_norms(block) -> list[torch.Tensor]:
        qk = (block.attn.q_norm.weight, block.attn.k_norm.weight) if block.attn.qk_norm else (none, none)
        return [block.attn_norm.weight, *qk, block.ffn_norm.weight]

    norms = [w for block in layers for w in layer_norms(block)] + [norm]
    model.native_plan = torch.classes.elmd.NativePlan(
        norms, [t for _, tensors, _ in args for t in tensors], [kind for kind, _, _ in args],
        [group for _, _, group in args], [b.attn.q_heads for b in layers], model.cfg.rms_norm_eps,
        model.cfg.ffn_with_glu, model.rope_cos, model.rope_sin)
    return True


class TorchBackend:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "auto",
        quant: str = "none",
        device: str = "auto",
        slots: int = 8,
        prefix_cache_bytes: int = 256 << 20,
        cuda_graphs: bool = True,
        compile_decode: bool = False,
        kv_cache_dtype: str = "auto",
    ):
        """`cuda_graphs`: replay decode steps from CUDA graphs (ignored off CUDA); with
        `compile_decode`, of a torch.compile'd step (cuda_graphs.compiled_step: fewer, fused
        kernels per graph, for compiles of tens of seconds on the first steps).
        `kv_cache_dtype`: auto, float16 or float32 (see pick_kv_cache_dtype)."""
        device = pick_device(device)
        if device == "cpu":
            set_threads()
        cfg = read_config(Path(model_dir))
        torch_dtype = pick_dtype(dtype, device, cfg.model_dim)

        def load() -> OpenELM:
            model = load_quantized_model(Path(model_dir), quant, torch_dtype, device)
            use_native_plan(model)
            model.kv_cache_dtype = pick_kv_cache_dtype(kv_cache_dtype, model)
            if cuda_graphs and torch.device(device).type == "cuda":
                from elmd.engine.cuda_graphs import DecodeGraphs, compiled_step

                model.decode_graphs = DecodeGraphs(model, compiled_step(model) if compile_decode else None)
            return model

        self.scheduler = Scheduler(load, slots=slots, prefix_cache_bytes=prefix_cache_bytes)
        self.model = model = self.scheduler.model
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        self.info = BackendInfo(
            name="torch",
            device=device,
            dtype=str(torch_dtype).removeprefix("torch."),
            quant=quant,
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            memory_bytes=weights,
            extra={"slots": slots, "cuda_graphs": model.decode_graphs is not None,
                   "compile_decode": model.decode_graphs is not None and compile_decode,
                   "kv_cache_dtype": str(model.transformer.layers[0].attn.cache.k.dtype).removeprefix("torch.")},
        )

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int]) -> StepChannel:
        return self.scheduler.submit(prompt_ids, params, stop_ids)

    def score(self, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        if len(token_ids) < 2:
            return []
        device = self.scheduler.device

        def score() -> list[TokenLogprob]:
            tokens = torch.tensor([token_ids], device=device)
            logits = self.model(tokens, torch.arange(len(token_ids), device=device)[None])[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            return [logprob_of(logprobs[i], token_ids[i + 1], top_n) for i in range(len(token_ids) - 1)]

        return self.scheduler.call(score)

    def close(self) -> None:
        self.scheduler.stop()
        self.model.drop_caches()
        self.scheduler.prefix_cache.clear()
        del self.model
