"""LoRA adapters (issue #34), through HTTP: what serving a model's adapters costs against
serving the model, in one daemon and one run.

`elmd serve` at its defaults (the offline model, SmolLM2-135M-Instruct at int4) with four
adapters given by `--lora-modules`, shaped as `mlx_lm.lora` makes them by default (rank 8,
scale 20, every linear layer of the last 16 blocks) or as `--rank/--layers` say. Measured in
alternating rounds (medians over `--rounds`; completions of `--max-tokens` with ignore_eos, each
prompt opening with its own nonce so no prefix cache helps):

- decode, batch 1: tokens/s after the first token of one streamed completion, on the base and
  on an adapter (target: at least 0.9x);
- decode, 8 streams: aggregate tokens/s of 8 concurrent completions on the base, and of 8 spread
  over the 4 adapters, two each, mixed in one batch (target: at least 0.8x);
- adapter load: the first request's time to first token on an adapter not yet loaded, less the
  next one's (the adapter read, checked and prepared beside the loaded base).

The daemons run without speculation unless `--speculation`: the adapters here are random, so their
replies differ from the base's, and prompt lookup's gain depends on the text (the base's and the
adapters' would be compared on different work).

Beside them, the machine's read bandwidth and the bytes a decode step streams: the base's
weights and, per adapter in the batch, its A and B (float16 over int8/int4 layers).

    python benchmarks/lora.py [--rounds 5] [--rank 8] [--layers 16] [--max-tokens 64]
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

from common import OFFLINE_MODEL, serve_offline_model
from matmul_speed import read_bandwidth_gbs

ADAPTERS = [f"lora-{i}" for i in range(4)]


def first_token_and_rate(base: str, model: str, max_tokens: int, rng: random.Random) -> tuple[float, float]:
    """(seconds to the first streamed token, decode tokens/s after it) of one completion."""
    body = {"model": model, "prompt": f"({rng.randrange(10**9)}) Once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    start, stamps = time.perf_counter(), []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text":""' not in line.replace(" ", ""):
                stamps.append(time.perf_counter())
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def concurrent_rate(base: str, models: list[str], max_tokens: int, rng: random.Random) -> float:
    """Aggregate completion tokens/s of one completion per entry of `models`, all at once."""
    async def one(client: httpx.AsyncClient, model: str) -> int:
        body = {"model": model, "prompt": f"({rng.randrange(10**9)}) Once upon a time", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        response = await client.post(f"{base}/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(client, m) for m in models)))
    return tokens / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rank", type=int, default=8, help="the adapters' rank (mlx_lm.lora's default: 8)")
    p.add_argument("--layers", type=int, default=16, help="adapted blocks, the last ones (mlx_lm.lora's default: 16)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--speculation", action="store_true", help="serve with prompt-lookup speculation (the default's)")
    args = p.parse_args(argv)
    from elmd.engine.lora import read_adapter
    from elmd.engine.checkpoint import read_config
    from elmd.fixtures import write_adapter

    rng = random.Random(0)
    bandwidth = read_bandwidth_gbs()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        home = work / "home"
        base_url, server = serve_offline_model(home, work / "serve.log")  # installs the offline model into `home`
        model_dir = home / "data" / "models" / OFFLINE_MODEL
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        folders = [write_adapter(work / name, model_dir, "mlx", rank=args.rank, seed=i, layers=args.layers, scale=20.0)
                   for i, name in enumerate(ADAPTERS)]
        adapter_params = sum(d.a.numel() + d.b.numel() for d in read_adapter(folders[0], read_config(model_dir)).deltas.values())
        modules = [f"{name}={folder}" for name, folder in zip(ADAPTERS, folders)]
        flags = () if args.speculation else ("--no-speculation",)
        base_url, server = serve_offline_model(home, work / "serve.log", serve_args=(*flags, "--lora-modules", *modules))
        try:
            first_token_and_rate(base_url, OFFLINE_MODEL, 8, rng)  # warm-up
            loads = []
            for name in ADAPTERS:
                cold, _ = first_token_and_rate(base_url, name, 8, rng)
                warm, _ = first_token_and_rate(base_url, name, 8, rng)
                loads.append(cold - warm)
            cards = {c["id"]: c for c in httpx.get(f"{base_url}/v1/models").json()["data"]}
            figures: dict[str, list[float]] = {k: [] for k in ("base 1", "adapter 1", "base 8", "adapters 8")}
            for i in range(args.rounds):
                for which in (("base", "adapter") if i % 2 == 0 else ("adapter", "base")):
                    model = OFFLINE_MODEL if which == "base" else ADAPTERS[i % 4]
                    figures[f"{which} 1"].append(first_token_and_rate(base_url, model, args.max_tokens, rng)[1])
                for which in (("base", "adapters") if i % 2 == 0 else ("adapters", "base")):
                    models = [OFFLINE_MODEL] * 8 if which == "base" else ADAPTERS * 2
                    figures[f"{which} 8"].append(asyncio.run(concurrent_rate(base_url, models, args.max_tokens, rng)))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    median = {k: statistics.median(v) for k, v in figures.items()}
    base_bytes = cards[OFFLINE_MODEL].get("memory_bytes") or 0
    print(f"offline model {OFFLINE_MODEL} at its default quant, speculation {'on' if args.speculation else 'off'}; 4 adapters of rank {args.rank} on the last "
          f"{args.layers} blocks ({adapter_params / 1e6:.2f} M parameters each, {cards[ADAPTERS[0]].get('memory_bytes', 0) / 1e6:.1f} MB "
          f"held; the base holds {base_bytes / 1e6:.0f} MB with its caches)")
    print(f"read bandwidth {bandwidth:.1f} GB/s: a decode step streaming the base's weights is bound near that; "
          f"each adapter in a step adds its A and B (float16 over int8/int4 layers: {adapter_params * 2 / 1e6:.1f} MB)")
    print(f"{'figure (median of ' + str(args.rounds) + ')':<44} {'base':>9} {'adapters':>9} {'ratio':>8}")
    print(f"{'decode tok/s, batch 1 (one adapter)':<44} {median['base 1']:9.1f} {median['adapter 1']:9.1f} "
          f"{median['adapter 1'] / median['base 1']:7.3f}x   (target >= 0.9x)")
    print(f"{'decode tok/s, 8 streams (4 adapters x 2)':<44} {median['base 8']:9.1f} {median['adapters 8']:9.1f} "
          f"{median['adapters 8'] / median['base 8']:7.3f}x   (target >= 0.8x)")
    print(f"adapter load (first request's TTFT less the next's): median {statistics.median(loads) * 1e3:.0f} ms, "
          f"max {max(loads) * 1e3:.0f} ms over {len(loads)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
