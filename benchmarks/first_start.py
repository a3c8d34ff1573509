"""The first ten minutes (issue 21): `elmd serve` on a fresh install, as the README's first
command runs it, timed from the process start.

A new ELMD_HOME (no model installed: the offline default is converted from its GGUF on
start) and an empty TORCH_EXTENSIONS_DIR (no CPU kernel build cached). Reported: seconds
to the port answering, to /health ready, to the first chat answer (sent as soon as the port
answers, so it includes whatever the daemon still had to do), and to the native kernels
taking over (full speed); decode tok/s of a greedy reply while the kernels build (they
share the CPUs) and after. Then a second start on the same home and cache: what every later
start costs.

    python benchmarks/first_start.py [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import REPO, StreamedReply, free_port

QUESTION = "Name three colors."


def chat(base: str, max_tokens: int) -> StreamedReply:
    return StreamedReply(base, "smollm2-135m-instruct", QUESTION, max_tokens)


def health(base: str) -> dict | None:
    try:
        return httpx.get(f"{base}/health", timeout=2).json()
    except (httpx.TransportError, ValueError):
        return None


def start(home: Path, extensions: Path, max_tokens: int, wait_for_kernels: bool) -> dict:
    port, t0 = free_port(), time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "ELMD_HOME": str(home), "TORCH_EXTENSIONS_DIR": str(extensions)}
    env.pop("ELMD_CPU_KERNELS", None)
    server = subprocess.Popen([sys.executable, "-m", "elmd", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base, result = f"http://127.0.0.1:{port}", {}
    try:
        while health(base) is None:
            if server.poll() is not None:
                raise RuntimeError(f"elmd serve exited: {server.stderr.read()[-2000:]}")
            time.sleep(0.05)
        result["listening_s"] = time.perf_counter() - t0
        first = chat(base, max_tokens)
        result["first_answer_s"] = time.perf_counter() - t0
        state = health(base) or {}
        result.update(first_ttft_s=first.ttft_s, first_decode_tok_s=first.decode_tok_s,
                      first_kernels=state.get("cpu_kernels"), first_text=first.text)
        while wait_for_kernels and (health(base) or {}).get("cpu_kernels_building"):
            if time.perf_counter() - t0 > 1800:
                raise RuntimeError("the kernels did not finish building in 30 min")
            time.sleep(0.5)
        result["full_speed_s"] = time.perf_counter() - t0
        replies = [chat(base, max_tokens) for _ in range(3)]
        result.update(decode_tok_s=max(r.decode_tok_s for r in replies),
                      kernels=(health(base) or {}).get("cpu_kernels"))
    finally:
        server.terminate()
        server.wait(30)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="elmd-first-start-") as work:
        home, extensions = Path(work) / "home", Path(work) / "torch-extensions"
        fresh = start(home, extensions, args.max_tokens, wait_for_kernels=True)
        later = start(home, extensions, args.max_tokens, wait_for_kernels=False)
    print(f"{'start':<8} {'listening s':>11} {'1st answer s':>12} {'1st on':>7} {'1st tok/s':>9} "
          f"{'full speed s':>12} {'tok/s':>7} {'on':>6}")
    for name, r in (("fresh", fresh), ("later", later)):
        print(f"{name:<8} {r['listening_s']:>11.1f} {r['first_answer_s']:>12.1f} {r['first_kernels']!s:>7} "
              f"{r['first_decode_tok_s'] or 0:>9.1f} {r['full_speed_s']:>12.1f} {r['decode_tok_s']:>7.1f} {r['kernels']!s:>6}")
    print(f"first reply: {fresh['first_text']!r}")
    if args.json:
        args.json.write_text(json.dumps({"fresh": fresh, "later": later}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
