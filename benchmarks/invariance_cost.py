"""What batch invariance costs (issue #30), through HTTP, in one run: the offline model at
its defaults (or `--quant`) served by this checkout and by `--before` (the checkout without
the change measured), each on its own store and kernel folder, measured in alternating rounds:

- prefill: prompt tokens/s of a ~400-token chat prompt (time to its first token; each
  prompt opens with its own nonce, so no prefix cache helps);
- decode, batch 1: tokens/s after the first, 128 tokens;
- decode, 8 streams: aggregate tokens/s of 8 concurrent completions of 128 tokens;
- prefill beside decode: time to first token of a ~400-token prompt sent while 7 streams decode.

Medians over `--rounds`, and after/before ratios (target: at least 0.97x on each).
The invariant prompt attention (74b8071), against this checkout with it reverted:

    git worktree add /tmp/before HEAD
    git -C /tmp/before show 74b8071 -- elmd/engine/kernels/decode.cpp | git -C /tmp/before apply -R
    python benchmarks/invariance_cost.py --before /tmp/before --rounds 5

The invariant float32 and bf16 matmuls (float_linear), against the commit before them:

    git worktree add /tmp/before a53f5eb
    python benchmarks/invariance_cost.py --before /tmp/before --quant none
    python benchmarks/invariance_cost.py --before /tmp/before --quant bf16

A change to ATen's path (the daemons get no ELMD_* variable of this shell, so name the path):

    python benchmarks/invariance_cost.py --before /tmp/before --cpu-kernels aten --quant int4
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import OFFLINE_MODEL, REPO, StreamedReply, serve_offline_model

WORDS = "river stone cloud garden lantern market violin harbor meadow comet archive pepper silver window".split()


def long_prompt(rng: random.Random, words: int = 300) -> str:
    return f"({rng.randrange(10**9)}) " + " ".join(rng.choice(WORDS) for _ in range(words)) + "\nSummarize."


def prefill_rate(base: str, prompt: str) -> float:
    """Prompt tokens per second to the first token of a one-token reply."""
    body = {"model": OFFLINE_MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
            "temperature": 0}
    start = time.perf_counter()
    reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600).json()
    return reply["usage"]["prompt_tokens"] / (time.perf_counter() - start)


async def _completion(client: httpx.AsyncClient, base: str, prompt: str, max_tokens: int) -> int:
    body = {"model": OFFLINE_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = await client.post(f"{base}/v1/completions", json=body)
    return response.json()["usage"]["completion_tokens"]


async def streams(base: str, rng: random.Random, count: int, max_tokens: int, late_prompt: str | None = None):
    """Aggregate decode tokens/s of `count` concurrent completions; with `late_prompt`, also
    the seconds to the first token of a chat sent once they are decoding."""
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(_completion(client, base, f"{rng.randrange(10**9)} {rng.choice(WORDS)}", max_tokens))
                 for _ in range(count)]
        late = None
        if late_prompt is not None:
            await asyncio.sleep(1.0)
            late_start = time.perf_counter()
            body = {"model": OFFLINE_MODEL, "messages": [{"role": "user", "content": late_prompt}], "max_tokens": 1}
            await client.post(f"{base}/v1/chat/completions", json=body)
            late = time.perf_counter() - late_start
        tokens = sum(await asyncio.gather(*tasks))
    return tokens / (time.perf_counter() - start), late


def measure(base: str, rng: random.Random) -> dict[str, float]:
    decode = StreamedReply(base, OFFLINE_MODEL, f"({rng.randrange(10**9)}) Write a long story about a harbor.", 128)
    return {"prefill tok/s": prefill_rate(base, long_prompt(rng)),
            "decode tok/s, 1 stream": decode.decode_tok_s,
            "decode tok/s, 8 streams": asyncio.run(streams(base, rng, 8, 128))[0],
            "TTFT s, prompt beside 7 streams": asyncio.run(streams(base, rng, 7, 128, long_prompt(rng)))[1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="the checkout to compare against")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quant", help="elmd serve's --quant for both (default: the model's)")
    p.add_argument("--cpu-kernels", help="ELMD_CPU_KERNELS for both (default: the CPU's best path)")
    args = p.parse_args(argv)
    serve_args = ("--quant", args.quant) if args.quant else ()
    kernels = {"ELMD_CPU_KERNELS": args.cpu_kernels} if args.cpu_kernels else {}
    rng = random.Random(0)
    figures: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as work:
        # each its own kernel folder: both builds share an extension name, with different sources
        daemons = {name: serve_offline_model(Path(work) / name, Path(work) / f"{name}.log", repo, serve_args,
                                             TORCH_EXTENSIONS_DIR=str(Path(work) / name / "torch_extensions"), **kernels)
                   for name, repo in (("before", args.before.resolve()), ("after", REPO))}
        try:
            for name, (base, _) in daemons.items():
                measure(base, rng)  # warm-up
            for i in range(args.rounds):
                for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                    figures[name].append(measure(daemons[name][0], rng))
        finally:
            for _, server in daemons.values():
                server.send_signal(signal.SIGTERM)
                server.wait(60)
    print(f"{'figure (median of ' + str(args.rounds) + ')':<34} {'before':>9} {'after':>9} {'after/before':>13}")
    for key in figures["after"][0]:
        before, after = (statistics.median(r[key] for r in figures[n]) for n in ("before", "after"))
        better = after / before if "tok/s" in key else before / after  # >1: after is faster
        print(f"{key:<34} {before:9.2f} {after:9.2f} {better:12.3f}x")
    print("after/before: the speed ratio (for TTFT, before's time over after's), same machine, same run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
