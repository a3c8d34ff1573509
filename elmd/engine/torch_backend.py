"""The PyTorch backend: OpenELM on CPU, CUDA or MPS, with continuous batching."""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import psutil
import torch

from elmd.engine.checkpoint import load_model, read_config
from elmd.engine.grammar import TokenMatcher
from elmd.engine.openelm import OpenELM
from elmd.engine.protocol import BackendInfo, CacheBytes, SamplingParams, StepChannel, TokenLogprob
from elmd.engine.runner import Runner
from elmd.engine.sampling import logprob_of
from elmd.engine.scheduler import Scheduler
from elmd.quant import Quant

log = logging.getLogger(__name__)
CACHED_BUILD_SECONDS = 5.0  # how long a load waits for the kernels: a cached build loads in about a second
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


def pick_kv_cache_dtype(kv_cache_dtype: str, runner: Runner) -> torch.dtype | None:
    """`auto`: float16 where the native plan runs a float32 model, as llama.cpp's default f16
    cache: half the cache's memory, and of the bytes a long context's decode step reads (270M
    int4 after 1,800 tokens: 94 -> 112 tok/s; logits within 5e-4 relative of a float32 cache
    on SmolLM2's real weights). Elsewhere the model's dtype (None)."""
    if kv_cache_dtype == "auto":
        return torch.float16 if runner.native_plan is not None else None
    if kv_cache_dtype not in ("float16", "float32"):
        raise ValueError(f"unknown KV cache dtype {kv_cache_dtype!r}; choose auto, float16 or float32")
    return DTYPES[kv_cache_dtype]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_same_tokenizer(model_dir: Path, draft_dir: Path) -> None:
    """A draft model's guesses are token ids of its own vocabulary: it must be the target's
    (the same tokenizer file and vocabulary size), else ValueError saying which differs."""
    sizes = [read_config(d).vocab_size for d in (model_dir, draft_dir)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the draft model {draft_dir.name} has {sizes[1]} tokens, {model_dir.name} {sizes[0]}: "
                         "a draft needs the same tokenizer")
    for name in TOKENIZER_FILES:
        files = [d / name for d in (model_dir, draft_dir)]
        if any(f.is_file() for f in files):
            if not all(f.is_file() for f in files) or files[0].read_bytes() != files[1].read_bytes():
                raise ValueError(f"the draft model {draft_dir.name} has another {name} than {model_dir.name}: "
                                 "a draft needs the same tokenizer")
            return


def set_threads() -> None:
    """One intra-op thread per physical core: hyper-threads only contend for the same
    memory bandwidth that batch-1 decode is bound by."""
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    torch.set_num_threads(cores)


def load_quantized_model(model_dir: Path, quant: Quant, dtype: torch.dtype, device: str) -> OpenELM:
    """The weights quantized as `quant`, from the stored file (see quant_store: written once,
    then read without quantizing); with none, the float weights as they are."""
    from elmd.engine import quant_store
    from elmd.engine.quantize import quantize_model

    if quant.is_none:
        return quantize_model(load_model(model_dir, dtype=dtype, device=device), quant)
    return quant_store.load(model_dir, quant, dtype, device)


def model_digest(model_dir: Path, sample: int = 1 << 20) -> str:
    """A digest of a checkpoint for BackendInfo.system_fingerprint: config.json, and each weight
    file's name, size, first and last `sample` bytes (its safetensors header and two ends of its
    data; reading every weight would cost seconds per gigabyte at each load)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.name == "config.json" or path.suffix == ".safetensors":
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}:".encode())
            with open(path, "rb") as f:
                digest.update(f.read(sample))
                f.seek(max(0, size - sample))
                digest.update(f.read(sample))
    return digest.hexdigest()[:16]


def kv_cache_dtype_name(model: OpenELM) -> str:
    return str(model.transformer.layers[0].attn.cache.k.dtype).removeprefix("torch.")


def cpu_kernels(runner: Runner, building: bool) -> dict:
    """Which CPU kernels run the model ("avx512", "avx512-vnni", "avx2" or "aten"), why not the best ones for this CPU
    (None when they are), and whether they are still building."""
    from elmd.engine.kernels import native

    if building:
        why = (f"the native kernels are building for this CPU (once; {native.build_estimate()}); "
               "the model moves to them when ready")
        return {"cpu_kernels": "aten", "cpu_kernels_reason": why, "cpu_kernels_building": True}
    path, why = native.kernel_path()
    if why is None and runner.native_plan is None:
        dtype = str(runner.model.transformer.norm.weight.dtype).removeprefix("torch.")
        why = (f"{dtype} activations: the fused decode plan runs float32 models" if dtype != "float32"
               else "the fused decode plan cannot run this model's layers")
    return {"cpu_kernels": path, "cpu_kernels_reason": why, "cpu_kernels_building": False}


class TorchBackend:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "auto",
        quant: str | Quant = "none",
        device: str = "auto",
        slots: int = 8,
        prefix_cache_bytes: int = 256 << 20,
        cuda_graphs: bool = True,
        compile_decode: bool = False,
        kv_cache_dtype: str = "auto",
        speculation: bool = True,
        draft_dir: str | Path | None = None,
        draft_quant: str | Quant = "none",
    ):
        """`cuda_graphs`: replay decode steps from CUDA graphs (ignored off CUDA); with
        `compile_decode`, of a torch.compile'd step (cuda_graphs.compiled_step: fewer, fused
        kernels per graph, for compiles of tens of seconds on the first steps).
        `kv_cache_dtype`: auto, float16 or float32 (see pick_kv_cache_dtype).
        `dtype` and `quant` are run as given: plan_load turns bf16 activations on the CPU into
        float32 ones beside bf16 weights.
        `speculation`: speculation at batch 1 (see Scheduler): with `draft_dir` (a smaller
        model with the same tokenizer, weights as `draft_quant`) its guesses, else prompt
        lookup's."""
        from elmd.engine.kernels import native

        device = pick_device(device)
        building = False
        if device == "cpu":
            set_threads()
            building = native.ops_after(CACHED_BUILD_SECONDS) is None and not native.build_in_background().done()
        cfg = read_config(Path(model_dir))
        torch_dtype = pick_dtype(dtype, device, cfg.model_dim)
        quant, draft_quant = Quant.parse(quant, "torch"), Quant.parse(draft_quant, "torch")
        self.name, self._kv_cache_dtype = Path(model_dir).name, kv_cache_dtype

        def load(path: Path, quant: Quant, graphs: bool) -> Runner:
            runner = Runner(load_quantized_model(path, quant, torch_dtype, device))
            runner.use_native_plan()
            runner.model.kv_cache_dtype = pick_kv_cache_dtype(kv_cache_dtype, runner)
            if graphs and cuda_graphs and torch.device(device).type == "cuda":
                from elmd.engine.cuda_graphs import DecodeGraphs, compiled_step

                runner.decode_graphs = DecodeGraphs(runner.model, compiled_step(runner.model) if compile_decode else None)
            return runner

        load_draft = None
        if draft_dir is not None and speculation:
            check_same_tokenizer(Path(model_dir), Path(draft_dir))
            load_draft = functools.partial(load, Path(draft_dir), draft_quant, False)
        self.scheduler = Scheduler(functools.partial(load, Path(model_dir), quant, True), slots=slots,
                                   prefix_cache_bytes=prefix_cache_bytes, speculation=speculation, load_draft=load_draft)
        self.runner = runner = self.scheduler.runner
        self.model = model = runner.model
        draft = self.scheduler.draft
        models = [model] + ([draft.model] if draft else [])
        tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
        weights = sum(t.numel() * t.element_size() for t in tensors) - sum(m.cache_bytes() for m in models)  # caches count live
        self.info = BackendInfo(
            name="torch",
            device=device,
            dtype=str(torch_dtype).removeprefix("torch."),
            quant=str(quant),
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            memory_bytes=weights,
            extra={"slots": slots, "cuda_graphs": runner.decode_graphs is not None,
                   "compile_decode": runner.decode_graphs is not None and compile_decode, "speculation": speculation,
                   "draft": Path(draft_dir).name if draft else None,
                   "kv_cache_dtype": kv_cache_dtype_name(model), "model_digest": model_digest(model_dir),
                   **(cpu_kernels(runner, building) if device == "cpu" else {})},
        )
        if building:
            native.build_in_background().add_done_callback(lambda _: self._use_built_kernels())

    def _use_built_kernels(self) -> None:
        """Once the background build ends: move the model to the native kernels between two
        scheduler steps (the stored tensors are the same for both paths; a sequence in flight
        carries on, its cached keys and values converted if the cache's dtype changes)."""

        def switch() -> None:
            from elmd.engine.quantize import choose_kernels_again

            for runner in [self.runner] + ([self.scheduler.draft.runner] if self.scheduler.draft else []):
                choose_kernels_again(runner.model)
                if runner.use_native_plan():
                    runner.model.set_kv_cache_dtype(pick_kv_cache_dtype(self._kv_cache_dtype, runner))
            self.info.extra.update(cpu_kernels(self.runner, building=False), kv_cache_dtype=kv_cache_dtype_name(self.model))

        try:
            self.scheduler.call(switch)
        except RuntimeError:  # unloaded while the kernels built
            return
        path, why = self.info.extra["cpu_kernels"], self.info.extra["cpu_kernels_reason"]
        log.info("%s: now on the %s CPU kernels%s", self.name, path, f" ({why})" if why else "")

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
               matcher: TokenMatcher | None = None, adapter: str | None = None) -> StepChannel:
        return self.scheduler.submit(prompt_ids, params, stop_ids, matcher, self._adapter_index(adapter))

    def load_adapter(self, name: str, directory: Path) -> int:
        """Read the LoRA adapter in `directory` (mlx-lm's or PEFT's layout) and serve it as `name`
        beside the base weights, shared and unmerged; the bytes it takes. AdapterError when it
        does not fit this model."""
        from elmd.engine.lora import read_adapter

        adapter = read_adapter(directory, self.model.cfg, name)
        return self.scheduler.call(lambda: self.runner.adapter_bytes(self.runner.add_adapter(adapter)))

    def unload_adapter(self, name: str) -> bool:
        """Drop adapter `name` and its cached prefixes, unless a sequence still uses it (False)."""

        def unload() -> bool:
            index = self.runner.adapters.indexes.get(name)
            if index is None:
                return True
            if self.scheduler.uses_adapter(index):
                return False
            self.runner.remove_adapter(name)
            self.scheduler.prefix_cache.drop_space(index)
            return True

        return self.scheduler.call(unload)

    def _adapter_index(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        index = self.runner.adapters.indexes.get(adapter)
        if index is None:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        return index

    def score(self, token_ids: list[int], top_n: int, adapter: str | None = None) -> list[TokenLogprob]:
        if len(token_ids) < 2:
            return []
        device = self.scheduler.device
        index = self._adapter_index(adapter)

        def score() -> list[TokenLogprob]:
            logits = self.runner.score(torch.tensor([token_ids], device=device), index)[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            return [logprob_of(logprobs[i], token_ids[i + 1], top_n) for i in range(len(token_ids) - 1)]

        return self.scheduler.call(score)

    def cache_bytes(self) -> CacheBytes:
        # Read from another thread: the cache's shape is set after each resize, so this
        # figure is one step stale at worst.
        draft = self.scheduler.draft.cache_bytes() if self.scheduler.draft else 0
        return CacheBytes(kv_cache=self.model.cache_bytes() + draft, prefix_cache=self.scheduler.prefix_cache.bytes)

    def speculated_tokens(self) -> tuple[int, int]:
        return self.scheduler.proposed_tokens, self.scheduler.accepted_tokens

    def limit_cache(self, budget) -> None:
        """`budget()`: bytes the KV cache and cached prefixes may take now (see Scheduler)."""
        self.scheduler.cache_budget = budget

    def close(self) -> None:
        self.scheduler.stop()
        self.model.drop_caches()
        self.scheduler.prefix_cache.clear()
        del self.model, self.runner
