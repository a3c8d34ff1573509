"""Is mlx-lm's batch generation batch-invariant? (issue #30: measured, not assumed.) The MLX
backend on this platform's MLX build, the OpenELM fixture or `--model`: each prompt generated greedily
with the chosen token's logprob three ways, and compared bit for bit with the first:

- alone, on an idle worker (prefix cache off: the whole prompt is computed);
- alone again with the prefix cache on, after a request holding the first 60% of it;
- beside 7 other prompts submitted at once (one batch of decode steps, prompts padded
  together by mlx-lm's BatchGenerator).

Prints, per dtype/quant and way, the share of replies with the same tokens and the same
logprob bits, and the largest logprob difference. A result, not a speed: it runs on
small shapes and is fine on a slow CPU build.

    python benchmarks/mlx_invariance.py --dtypes float32 bfloat16 --quants none int8
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)

from elmd.engine.mlx_backend import MLXBackend
from elmd.engine.protocol import SamplingParams
from elmd.fixtures import write_checkpoint

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True)


def generate(backend: MLXBackend, prompts: list[list[int]]) -> tuple[list[list[tuple[int, float]]], int]:
    """Submit all prompts at once (one batch), then read each reply's (token, logprob)s; and
    the prompt tokens the first reply took from the prefix cache."""
    channels = [backend.submit(prompt, GREEDY, frozenset()) for prompt in prompts]
    replies = [[(step.token_id, step.logprob.logprob) for step in channel] for channel in channels]
    return replies, channels[0].cached_tokens


def compare(reference: list[tuple[int, float]], other: list[tuple[int, float]]) -> tuple[bool, bool, float]:
    """(same tokens, same logprob bits, largest logprob difference over the common tokens)."""
    same_tokens = [t for t, _ in reference] == [t for t, _ in other]
    deltas = [abs(a - b) for (ta, a), (tb, b) in zip(reference, other) if ta == tb]
    return same_tokens, same_tokens and all(d == 0.0 for d in deltas), max(deltas, default=0.0)


def measure(model_dir: Path, dtype: str, quant: str, prompts: list[list[int]], others: list[list[int]]) -> dict:
    cold_backend = MLXBackend(model_dir, dtype=dtype, quant=quant, prefix_cache_bytes=0)
    try:
        alone = [generate(cold_backend, [prompt])[0][0] for prompt in prompts]
        beside = [generate(cold_backend, [prompt] + others)[0][0] for prompt in prompts]
    finally:
        cold_backend.close()
    cached_backend = MLXBackend(model_dir, dtype=dtype, quant=quant)
    try:
        cached = []
        for prompt in prompts:
            generate(cached_backend, [prompt[: len(prompt) * 6 // 10]])
            replies, reused = generate(cached_backend, [prompt])
            assert reused > 0, "the prefix cache was not used: this way would measure nothing"
            cached.append(replies[0])
    finally:
        cached_backend.close()
    return {way: [compare(a, b) for a, b in zip(alone, replies)] for way, replies in
            (("prefix-cache hit", cached), ("beside 7 others", beside))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--quants", nargs="+", default=["none", "int8"])
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--model", type=Path, help="a model folder in the hub's layout (an installed model's "
                   "store folder); default: the OpenELM fixture")
    args = p.parse_args(argv)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 1000) for _ in range(rng.randrange(12, 40))] for _ in range(args.prompts)]
    others = [[1] + [rng.randrange(3, 1000) for _ in range(rng.randrange(4, 60))] for _ in range(7)]
    import mlx.core as mx
    print(f"mlx {mx.__version__}, device {mx.default_device()}, {args.prompts} prompts, 24 greedy tokens each")
    print(f"{'dtype':<9} {'quant':<6} {'way':<17} {'same tokens':>11} {'same bits':>9} {'max |dlogprob|':>15}")
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model or write_checkpoint(Path(work) / "tiny-openelm", shape="tiny", seed=0)
        for dtype in args.dtypes:
            for quant in args.quants:
                if quant != "none" and dtype == "float32":
                    continue  # quantized models run bf16 on MLX (fp16 overflows; see mlx_backend)
                for way, rows in measure(model_dir, dtype, quant, prompts, others).items():
                    tokens, bits = sum(r[0] for r in rows), sum(r[1] for r in rows)
                    print(f"{dtype:<9} {quant:<6} {way:<17} {tokens:>5}/{len(rows):<5} {bits:>4}/{len(rows):<4} "
                          f"{max(r[2] for r in rows):15.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
