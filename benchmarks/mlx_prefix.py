"""The MLX backend's prefix cache (issue 20): a chat's second turn, time to first token with
the cache and without, in this process.

The first turn is a history of --history tokens and a short reply; the second turn sends
that history, the reply and a few new tokens. With the cache only the new tokens are
prefilled. Each backend (cache on, cache off) is measured --repeats times on its own
prompts (different per repeat, so only the second turn can hit), median taken.
MLX's Linux CPU build is slow: the default checkpoint is the 270M fixture in float32.

    python benchmarks/mlx_prefix.py [--model 270M] [--history 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import model_dirs, prompt_ids


def second_turn_ttft(backend, history: list[int]) -> tuple[float, int]:
    from elmd.engine.protocol import SamplingParams

    reply = [s.token_id for s in backend.submit(history, SamplingParams(max_tokens=8, temperature=0), frozenset())]
    t = time.perf_counter()
    channel = backend.submit(history + reply + [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=1, temperature=0),
                             frozenset())
    next(iter(channel))
    return time.perf_counter() - t, channel.cached_tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="270M")
    p.add_argument("--history", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "elmd-bench")
    args = p.parse_args(argv)

    from elmd.engine.mlx_backend import MLXBackend

    [model] = model_dirs([args.model], args.work_dir).values()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    results = {}
    for label, size in (("prefix cache on", 256 << 20), ("prefix cache off", 0)):
        backend = MLXBackend(model, dtype="float32", prefix_cache_bytes=size)
        try:
            runs = [second_turn_ttft(backend, prompt_ids(args.history, vocab, 50 + i)) for i in range(args.repeats)]
        finally:
            backend.close()
        results[label] = (statistics.median(t for t, _ in runs), runs[0][1])
    print(f"\n{args.model} fixture, MLX float32, second turn after a {args.history}-token history")
    for label, (ttft, cached) in results.items():
        print(f"  {label:17} time to first token {ttft * 1e3:8.0f} ms  (cached tokens {cached})")
    on, off = results["prefix cache on"][0], results["prefix cache off"][0]
    print(f"  with the cache: {on / off:.0%} of the time without")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
