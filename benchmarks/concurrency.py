"""Many clients at once, through the real daemon's HTTP API (issue 5).

Starts `elmd serve` on a generated checkpoint (270M-shaped by default) and measures, in
one run so the figures compare:
  - aggregate decode tokens/s with 1, 4, 8 and 16 concurrent streaming clients;
  - time to first token of a chat's second turn over a 1,000-token history, with the
    prefix cache and without it (a second daemon started with the cache off);
  - the daemon's resident memory after the first 10 and after N mixed requests.

    python benchmarks/concurrency.py [--shape 270M] [--requests 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from common import free_port, wait_ready
from elmd.fixtures import write_checkpoint

WORDS = "river stone cloud garden lantern market violin harbor meadow comet archive pepper silver window".split()


@contextmanager
def daemon(model_dir: Path, home: Path, prefix_cache_bytes: int, slots: int, quant: str = "none"):
    port = free_port()
    env = {**os.environ, "ELMD_HOME": str(home), "ELMD_PREFIX_CACHE_BYTES": str(prefix_cache_bytes)}
    cmd = [sys.executable, "-m", "elmd", "serve", "--model", str(model_dir), "--port", str(port),
           "--backend", "torch", "--quant", quant, "--max-concurrent-requests", str(slots),
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        if wait_ready(base, proc) is None:
            raise RuntimeError("daemon did not become ready")
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def stream_completion(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int):
    """Returns (seconds to first token, tokens, seconds from first to last token)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                now = time.perf_counter()
                first = first or now
                last = now
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first - start, tokens, last - first


async def aggregate_decode(base: str, model: str, clients: int, max_tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(stream_completion(client, base, model, f"{WORDS[i % len(WORDS)]} {i}", max_tokens) for i in range(clients))
        )
        wall = time.perf_counter() - start
    return sum(tokens for _, tokens, _ in results) / wall


def history_of(client: httpx.Client, model: str, tokens: int) -> list[dict]:
    """A one-message conversation whose prompt is about `tokens` tokens long."""
    rng = random.Random(0)
    words: list[str] = []
    while True:
        words += [rng.choice(WORDS) for _ in range(50)]
        messages = [{"role": "user", "content": " ".join(words)}]
        count = client.post("/tokenize", json={"model": model, "messages": messages}).json()["count"]
        if count >= tokens:
            return messages


def second_turn_ttft(base: str, model: str, history_tokens: int) -> tuple[float, int, int]:
    with httpx.Client(base_url=base, timeout=600) as client:
        messages = history_of(client, model, history_tokens)
        first = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 8, "temperature": 0}).json()
        messages += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        # One token: its chunk (content, or only finish_reason if the token is blank) ends the prefill.
        body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        start = time.perf_counter()
        ttft, usage = None, {}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                choice = (event.get("choices") or [{}])[0]
                if ttft is None and (choice.get("delta", {}).get("content") or choice.get("finish_reason")):
                    ttft = time.perf_counter() - start
                usage = event.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return ttft, usage.get("prompt_tokens", 0), details.get("cached_tokens", 0)


def mixed_requests(base: str, model: str, count: int, pid: int) -> tuple[int, int]:
    """RSS after the first 10 and after `count` requests of mixed kinds and lengths."""
    rng = random.Random(1)
    proc = psutil.Process(pid)
    after_10 = 0
    with httpx.Client(base_url=base, timeout=600) as client:
        for i in range(count):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 200)))
            if i % 3 == 0:
                client.post("/v1/chat/completions", json={"model": model, "max_tokens": rng.randint(1, 8),
                            "messages": [{"role": "user", "content": words}]})  # fmt: skip
            elif i % 3 == 1:
                client.post("/v1/completions", json={"model": model, "prompt": words, "max_tokens": rng.randint(1, 8)})
            else:
                with client.stream("POST", "/v1/completions", json={"model": model, "prompt": words, "max_tokens": 16, "stream": True}) as r:
                    for _ in r.iter_lines():
                        break  # a client that goes away mid-stream
            if i == 9:
                after_10 = proc.memory_info().rss
    return after_10, proc.memory_info().rss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="270M")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--quant", default="none", help="weight quantization of the served model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_checkpoint(tmp / args.shape, args.shape, dtype="bfloat16")
        model = model_dir.name
        results: dict = {"shape": args.shape, "quant": args.quant, "aggregate_tok_s": {}}
        with daemon(model_dir, tmp / "home-cache", 256 << 20, slots=16, quant=args.quant) as (base, pid):
            asyncio.run(aggregate_decode(base, model, 1, 4))  # warm up
            for clients in (1, 4, 8, 16):
                rate = asyncio.run(aggregate_decode(base, model, clients, args.max_tokens))
                results["aggregate_tok_s"][clients] = rate
                print(f"{clients:>3} concurrent streams: {rate:7.1f} tok/s aggregate", flush=True)
            ttft, prompt_tokens, cached = second_turn_ttft(base, model, args.history_tokens)
            results["second_turn"] = {"with_cache_s": ttft, "prompt_tokens": prompt_tokens, "cached_tokens": cached}
            rss10, rss_n = mixed_requests(base, model, args.requests, pid)
            results["rss"] = {"after_10": rss10, f"after_{args.requests}": rss_n}
        with daemon(model_dir, tmp / "home-nocache", 0, slots=16, quant=args.quant) as (base, _):
            ttft_off, _, cached_off = second_turn_ttft(base, model, args.history_tokens)
            results["second_turn"].update(without_cache_s=ttft_off, cached_tokens_without=cached_off)

    agg = results["aggregate_tok_s"]
    turn = results["second_turn"]
    print()
    print(f"| measure ({args.shape}, quant {args.quant}, one run) | value | target |")
    print("|---|---|---|")
    print(f"| 8 streams / 1 stream aggregate decode | {agg[8] / agg[1]:.2f}x | >= 4x |")
    print(f"| 16 streams / 1 stream aggregate decode | {agg[16] / agg[1]:.2f}x | |")
    print(f"| second-turn TTFT, {turn['prompt_tokens']}-token prompt: cached {turn['with_cache_s'] * 1000:.0f} ms "
          f"({turn['cached_tokens']} reused) / uncached {turn['without_cache_s'] * 1000:.0f} ms "
          f"| {turn['with_cache_s'] / turn['without_cache_s']:.1%} | <= 20% |")  # fmt: skip
    rss = results["rss"]
    print(f"| RSS after {args.requests} mixed requests / after 10 | {rss[f'after_{args.requests}'] / rss['after_10']:.3f} "
          f"({rss['after_10'] >> 20} -> {rss[f'after_{args.requests}'] >> 20} MiB) | <= 1.10 |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
