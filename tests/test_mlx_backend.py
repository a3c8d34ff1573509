"""The MLX backend: continuous batching on mlx-lm's BatchGenerator, per-request sampling,
cancellation, agreement with the PyTorch backend and with `score()`, and quantization.

Stated tolerances (measured values in brackets, MLX 0.32 Linux CPU build):
- fp32 on the tiny fixture: greedy tokens identical to the PyTorch backend, with and
  without penalties; reported logprobs within 1e-4 of `score()`.
- Quantized logits against the same model in bf16, over a 24-token prompt: the smallest
  cosine similarity of any position's logits, and the share of positions whose top-1 agrees.
  tiny: int8 >= 0.999 [0.9997], top-1 >= 0.95 [1.0]; int4 g64/g32/g128 >= 0.94
  [0.964/0.973/0.964], top-1 >= 0.8 [0.92/0.96/0.92].
  3B-shaped (the 3B's first and last layers, full widths and vocabulary): int8 >= 0.995
  [0.9986], top-1 >= 0.85 [0.92]; int4 >= 0.85 [0.896], finite, not <unk>-only. Random
  weights are the hard case for 4 bits (no structure, near-ties among 32,000 logits: top-1
  agrees at only 0.29), so int4's quality is gated on the real model's perplexity instead.
- The reported 3B failure (4/8-bit MLX conversions emit only <unk>) is fp16 overflow: a
  residual channel beyond 65,504 makes fp16 logits NaN and greedy picks <unk> (reproduced
  here on the tiny model); quantized models run bf16 and refuse fp16.
- Perplexity of the offline model (SmolLM2-135M, bf16, the 163-token paragraph): int8
  within 2% [22.32 vs 22.44: -0.5%], int4 within 10% [23.98: +6.9%] of the unquantized model.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")

from mlx_lm.generate import generate_step  # noqa: E402

from elmd.engine.load import load_engine  # noqa: E402
from elmd.engine.mlx_backend import MLXBackend, load_mlx_model  # noqa: E402
from elmd.engine.protocol import SamplingParams  # noqa: E402
from elmd.fixtures import config_for, write_checkpoint  # noqa: E402

PROMPTS = [
    [1, 450, 49, 17, 170, 29, 432],
    [1, 5, 6],
    [1, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 300],
    [1, 777],
]
PARAGRAPH = Path(__file__).parent / "data" / "english_paragraph.txt"


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    backend = MLXBackend(tiny_checkpoint, dtype="float32")
    yield backend
    backend.close()


def tokens(channel) -> list[int]:
    return [step.token_id for step in channel]


def run(backend, prompt, params, stop_ids=frozenset()):
    channel = backend.submit(prompt, params, stop_ids)
    return tokens(channel), channel.finished.reason


def varied_params() -> list[SamplingParams]:
    """One request per sampling feature, all seeded."""
    return [
        SamplingParams(max_tokens=16, temperature=0.9, top_p=0.8, seed=11),
        SamplingParams(max_tokens=12, temperature=1.2, top_k=20, repetition_penalty=1.3, seed=12, logprobs=2),
        SamplingParams(max_tokens=20, temperature=0.7, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, seed=13),
        SamplingParams(max_tokens=9, temperature=0.0),
    ]


def test_seeded_requests_give_the_same_tokens_alone_and_batched(backend):
    params = varied_params()
    alone = [run(backend, p, sp)[0] for p, sp in zip(PROMPTS, params)]
    assert [len(t) for t in alone] == [sp.max_tokens for sp in params]

    channels = [backend.submit(p, sp, frozenset()) for p, sp in zip(PROMPTS, params)]
    assert [tokens(c) for c in channels] == alone

    # Late joiners: two requests enter while the first is mid-generation.
    first = backend.submit(PROMPTS[0], params[0], frozenset())
    steps = iter(first)
    head = [next(steps).token_id for _ in range(3)]
    later = [backend.submit(p, sp, frozenset()) for p, sp in zip(PROMPTS[1:3], params[1:3])]
    assert head + tokens(steps) == alone[0]
    assert [tokens(c) for c in later] == alone[1:3]


def test_seeds_choose_the_draw(backend):
    draw = lambda seed: run(backend, PROMPTS[0], SamplingParams(max_tokens=16, temperature=1.0, seed=seed))[0]  # noqa: E731
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def batch_cache_bytes(backend: MLXBackend) -> int:
    """Bytes of KV cache the running and waiting requests hold (0 when idle), read on the worker."""
    return backend._on_worker(lambda: backend._generator.prompt_cache_nbytes)


def test_cancelled_request_stops_within_a_step_and_frees_its_cache(backend):
    greedy = SamplingParams(max_tokens=48, temperature=0.0)
    expected = run(backend, PROMPTS[2], greedy)[0]

    kept = backend.submit(PROMPTS[2], greedy, frozenset())
    gone = backend.submit(PROMPTS[0], SamplingParams(max_tokens=1500, temperature=0.0), frozenset())
    steps = iter(gone)
    next(steps)
    assert batch_cache_bytes(backend) > 0
    gone.cancel()
    already_queued = gone._queue.qsize()
    rest = list(steps)
    assert gone.finished.reason == "cancelled"
    assert len(rest) <= already_queued + 2, "the worker kept decoding after the cancel"
    assert tokens(kept) == expected  # its neighbour was unaffected
    assert batch_cache_bytes(backend) == 0

    early = backend.submit(PROMPTS[1], SamplingParams(max_tokens=1500), frozenset())
    early.cancel()
    assert len(tokens(early)) <= 2 and early.finished.reason == "cancelled"


def test_stop_ids_max_tokens_and_ignore_eos(backend):
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    full, reason = run(backend, PROMPTS[0], greedy)
    assert reason == "length" and len(full) == 16
    stop = full[5]
    cut = full.index(stop) + 1
    assert run(backend, PROMPTS[0], greedy, frozenset({stop})) == (full[:cut], "eos")
    ignoring = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert run(backend, PROMPTS[0], ignoring, frozenset({stop})) == (full, "length")
    assert run(backend, PROMPTS[0], SamplingParams(max_tokens=0), frozenset()) == ([], "length")


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_reported_logprobs_agree_with_score(backend, penalty):
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, repetition_penalty=penalty)
    channel = backend.submit(PROMPTS[2], params, frozenset())
    steps = list(channel)
    scored = backend.score(PROMPTS[2] + [s.token_id for s in steps], 3)[len(PROMPTS[2]) - 1 :]
    assert len(scored) == len(steps)
    for step, reference in zip(steps, scored):
        got = step.logprob
        assert got.token_id == reference.token_id
        assert abs(got.logprob - reference.logprob) <= 1e-4
        assert [i for i, _ in got.top] == [i for i, _ in reference.top]
        assert np.allclose([v for _, v in got.top], [v for _, v in reference.top], atol=1e-4)


def test_greedy_tokens_equal_the_torch_backend(tiny_checkpoint):
    requests = [
        dict(temperature=0, max_tokens=32, ignore_eos=True),
        dict(temperature=0, max_tokens=32, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.4,
             frequency_penalty=0.2),
    ]  # fmt: skip
    outputs = {}
    for name in ("torch", "mlx"):
        engine = load_engine(tiny_checkpoint, backend=name, dtype="float32")
        try:
            jobs = [(prompt, engine.params(**r)) for prompt in PROMPTS[:2] for r in requests]
            with ThreadPoolExecutor(len(jobs)) as pool:  # concurrently: MLX batches them
                outputs[name] = list(pool.map(lambda job: engine.generate(*job).token_ids, jobs))
        finally:
            engine.close()
    assert outputs["mlx"] == outputs["torch"]


def test_unknown_quantizations_and_fp16_quantized_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="int8 or int4"):
        MLXBackend(tiny_checkpoint, quant="int3")
    with pytest.raises(ValueError, match="int8 or int4"):
        MLXBackend(tiny_checkpoint, quant="int4-g48")
    with pytest.raises(ValueError, match="float16"):
        MLXBackend(tiny_checkpoint, dtype="float16", quant="int8")


def test_a_closed_backend_refuses_work(tiny_checkpoint):
    backend = MLXBackend(tiny_checkpoint, dtype="float32")
    running = backend.submit(PROMPTS[0], SamplingParams(max_tokens=1500), frozenset())
    backend.close()
    list(running)
    assert running.finished.reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        backend.score(PROMPTS[0], 0)


# ---- quantization ------------------------------------------------------------------


def closeness(quantized: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(smallest cosine similarity of one position's logits, share of top-1 agreement)."""
    cosine = (quantized * reference).sum(-1) / np.linalg.norm(quantized, axis=-1) / np.linalg.norm(reference, axis=-1)
    return float(cosine.min()), float((quantized.argmax(-1) == reference.argmax(-1)).mean())


def prompt_for(vocab_size: int) -> list[int]:
    return [1] + np.random.default_rng(1).integers(3, vocab_size, 23).tolist()


def logits_of(model, prompt: list[int]) -> np.ndarray:
    out = model(mx.array([prompt]))[0].astype(mx.float32)
    return np.array(out)


TINY_BOUNDS = {"int8": (0.999, 0.95), "int4": (0.94, 0.8), "int4-g32": (0.94, 0.8), "int4-g128": (0.94, 0.8)}


@pytest.mark.parametrize("quant", list(TINY_BOUNDS))
def test_quantized_logits_stay_close_to_bf16_on_the_tiny_model(tiny_checkpoint, quant):
    prompt = prompt_for(1024)
    reference = logits_of(load_mlx_model(tiny_checkpoint, "bfloat16"), prompt)
    quantized = logits_of(load_mlx_model(tiny_checkpoint, "auto", quant), prompt)
    cosine, top1 = closeness(quantized, reference)
    print(f"tiny {quant}: min cosine {cosine:.5f}, top-1 agreement {top1:.3f}")
    assert cosine >= TINY_BOUNDS[quant][0] and top1 >= TINY_BOUNDS[quant][1]


@pytest.fixture(scope="module")
def massive_activation(tmp_path_factory) -> Path:
    """The tiny model with one residual channel pushed past fp16's range (~2e5 after layer 0),
    like the large-magnitude channels of big models: the 3B overflows fp16."""
    from safetensors.numpy import load_file, save_file

    path = write_checkpoint(tmp_path_factory.mktemp("massive") / "tiny-massive", "tiny", seed=0)
    weights = load_file(path / "model.safetensors")
    name = "transformer.layers.0.ffn.proj_2.weight"
    weights[name] = weights[name].copy()
    weights[name][7] *= 3e7
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def greedy_tokens(model, prompt: list[int], n: int = 6) -> list[int]:
    return [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def test_quantized_model_survives_activations_beyond_fp16(massive_activation):
    prompt = PROMPTS[0]
    in_fp16 = load_mlx_model(massive_activation, "float16")
    assert not np.isfinite(logits_of(in_fp16, prompt)).all()
    assert set(greedy_tokens(in_fp16, prompt)) == {0}  # the reported failure: only <unk>

    reference = logits_of(load_mlx_model(massive_activation, "bfloat16"), prompt)
    for quant in ("int8", "int4"):
        model = load_mlx_model(massive_activation, "auto", quant)
        quantized = logits_of(model, prompt)
        assert np.isfinite(quantized).all()
        assert closeness(quantized, reference)[0] >= 0.94
        assert set(greedy_tokens(model, prompt)) != {0}


@pytest.fixture(scope="module")
def reduced_3b(tmp_path_factory) -> tuple[Path, list[int], np.ndarray]:
    """The 3B's shape cut to its first and last layers (every width, the 32,000 vocab), bf16,
    with the bf16 reference logits over the prompt."""
    config = config_for("3B")
    keep = [0, config["num_transformer_layers"] - 1]
    per_layer = ("num_query_heads", "num_kv_heads", "ffn_multipliers")
    overrides = {"num_transformer_layers": len(keep), **{k: [config[k][i] for i in keep] for k in per_layer}}
    path = write_checkpoint(tmp_path_factory.mktemp("3b") / "openelm-3b-2layers", "3B", dtype="bfloat16",
                            config_overrides=overrides)  # fmt: skip
    prompt = prompt_for(config["vocab_size"])
    return path, prompt, logits_of(load_mlx_model(path, "bfloat16"), prompt)


@pytest.mark.slow
@pytest.mark.parametrize("quant, bounds", [("int8", (0.995, 0.85)), ("int4", (0.85, None))])
def test_quantized_3b_shape_stays_close_to_bf16_and_never_emits_only_unk(reduced_3b, quant, bounds):
    path, prompt, reference = reduced_3b
    model = load_mlx_model(path, "auto", quant)
    quantized = logits_of(model, prompt)
    cosine, top1 = closeness(quantized, reference)
    print(f"3B-shaped {quant}: min cosine {cosine:.5f}, top-1 agreement {top1:.3f}")
    assert np.isfinite(quantized).all()
    assert cosine >= bounds[0] and (bounds[1] is None or top1 >= bounds[1])
    assert set(greedy_tokens(model, prompt, 4)) != {0}, "the model emitted only <unk>"


@pytest.mark.slow
def test_quantized_perplexity_of_the_offline_model(tmp_path_factory):
    from offline_checkpoint import converted

    checkpoint = converted(tmp_path_factory)
    text = PARAGRAPH.read_text().strip()
    perplexity = {}
    for quant in ("none", "int8", "int4"):
        engine = load_engine(checkpoint, backend="mlx", quant=quant)
        try:
            logprobs = engine.score(engine.tokenizer.encode(text))
        finally:
            engine.close()
        perplexity[quant] = math.exp(-sum(lp.logprob for lp in logprobs) / len(logprobs))
    print("MLX perplexity:", {k: round(v, 3) for k, v in perplexity.items()})
    assert perplexity["none"] < 40
    assert perplexity["int8"] <= 1.02 * perplexity["none"]
    assert perplexity["int4"] <= 1.10 * perplexity["none"]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_a_chat_s_next_turn_reuses_the_prefix_and_answers_as_without(tiny_checkpoint, penalty):
    """The prefix cache: the second turn repeats the first turn's prompt and reply, so its
    keys and values come from the cache (`cached_tokens`), and the reply is the one a
    backend without the cache gives: same tokens, logprobs within 1e-4 (float32; the rest
    of the prompt is prefilled in another chunk); penalties still see the whole context."""
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, repetition_penalty=penalty)
    turns = {}
    for size in (256 << 20, 0):
        backend = MLXBackend(tiny_checkpoint, dtype="float32", prefix_cache_bytes=size)
        try:
            first = backend.submit(PROMPTS[2], params, frozenset())
            reply = tokens(first)
            second = backend.submit(PROMPTS[2] + reply + [5, 6, 7, 8], params, frozenset())
            steps = list(second)
            turns[size] = (reply, steps, second.cached_tokens, backend.cache_bytes().prefix_cache)
        finally:
            backend.close()
    (reply_on, steps_on, cached_on, bytes_on), (reply_off, steps_off, cached_off, bytes_off) = turns[256 << 20], turns[0]
    assert reply_on == reply_off
    assert cached_on >= len(PROMPTS[2]) + len(reply_on) - 1 and cached_off == 0
    assert bytes_on > 0 and bytes_off == 0
    assert [s.token_id for s in steps_on] == [s.token_id for s in steps_off]
    for a, b in zip(steps_on, steps_off):
        assert a.logprob.logprob == pytest.approx(b.logprob.logprob, abs=1e-4)
