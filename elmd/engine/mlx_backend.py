"""The MLX backend: mlx-lm's OpenELM on Apple silicon (and on MLX's Linux CPU build).

mlx-lm does the modelling, sampling and KV cache; this file only adapts it to the
backend contract. One worker thread owns the model (MLX state is per thread) and serves
requests in arrival order.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import load_model

from elmd.engine.protocol import BackendInfo, Finished, SamplingParams, Step, StepChannel, TokenLogprob

QUANT_BITS = {"int8": 8, "int4": 4}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _logprob(logprobs: mx.array, token: int, top_n: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        ids = mx.argsort(-logprobs)[:top_n]
        top = tuple(zip(ids.tolist(), logprobs[ids].tolist()))
    return TokenLogprob(token, logprobs[token].item(), top)


class MLXBackend:
    def __init__(self, model_dir: str | Path, dtype: str = "auto", quant: str = "none", group_size: int = 64):
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        loaded: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, args=(model_dir, dtype, quant, group_size, loaded), daemon=True)
        self._thread.start()
        error = loaded.get()
        if error is not None:
            raise error
        self.info = BackendInfo(
            name="mlx",
            device="mlx-" + ("gpu" if mx.default_device() == mx.gpu else "cpu"),
            dtype=str(self._dtype).removeprefix("mlx.core."),
            quant=quant,
            context_length=min(config.get("max_context_length", 2048), config.get("rope_max_length", 4096)),
            vocab_size=config["vocab_size"],
            memory_bytes=sum(v.nbytes for _, v in nn.utils.tree_flatten(self.model.parameters())),
        )

    def _load(self, model_dir: Path, dtype: str, quant: str, group_size: int) -> None:
        model, _ = load_model(model_dir)
        # bf16 by default: the 3B overflows fp16, and quantized weights keep bf16 scales.
        self._dtype = mx.bfloat16 if dtype == "auto" else DTYPES[dtype]
        model.set_dtype(self._dtype)
        if quant != "none":
            if quant not in QUANT_BITS:
                raise ValueError(f"unknown quantization {quant!r} for MLX; choose none, int8 or int4")
            nn.quantize(model, group_size=group_size, bits=QUANT_BITS[quant])
        mx.eval(model.parameters())
        self.model = model

    def _work(self, model_dir, dtype, quant, group_size, loaded: queue.SimpleQueue) -> None:
        try:
            self._load(model_dir, dtype, quant, group_size)
        except Exception as e:
            loaded.put(e)
            return
        loaded.put(None)
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int]) -> StepChannel:
        channel = StepChannel()
        self._jobs.put(lambda: self._generate(channel, prompt_ids, params, stop_ids))
        return channel

    def _generate(self, channel: StepChannel, prompt_ids: list[int], params: SamplingParams, stop_ids) -> None:
        if channel.cancelled or params.max_tokens <= 0:
            channel.close(Finished("cancelled" if channel.cancelled else "length"))
            return
        if params.seed is not None:
            mx.random.seed(params.seed)
        sampler = make_sampler(
            temp=0.0 if params.greedy else params.temperature,
            top_p=params.top_p if params.top_p < 1.0 else 0.0,
            min_p=params.min_p,
            top_k=params.top_k,
        )
        window = self.info.context_length
        processors = make_logits_processors(
            repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
            repetition_context_size=window,
            presence_penalty=params.presence_penalty or None,
            presence_context_size=window,
            frequency_penalty=params.frequency_penalty or None,
            frequency_context_size=window,
        )
        room = self.info.context_length - len(prompt_ids)
        steps = generate_step(
            mx.array(prompt_ids), self.model, max_tokens=min(params.max_tokens, room), sampler=sampler, logits_processors=processors
        )
        reason = "length"
        try:
            for token, logprobs in steps:
                if channel.cancelled:
                    reason = "cancelled"
                    break
                lp = _logprob(logprobs, token, params.logprobs) if params.logprobs is not None else None
                channel.put(Step(token, lp))
                if token in stop_ids and not params.ignore_eos:
                    reason = "eos"
                    break
        except Exception as e:
            channel.close(Finished("error", error=f"{type(e).__name__}: {e}"))
            return
        channel.close(Finished(reason))

    def score(self, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        if len(token_ids) < 2:
            return []
        result: queue.SimpleQueue = queue.SimpleQueue()

        def job():
            try:
                logits = self.model(mx.array([token_ids]))[0, :-1].astype(mx.float32)
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                result.put([_logprob(logprobs[i], token_ids[i + 1], top_n) for i in range(len(token_ids) - 1)])
            except Exception as e:
                result.put(e)

        self._jobs.put(job)
        out = result.get()
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self.model = None
