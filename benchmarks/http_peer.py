"""elmd and llama.cpp's `llama-server` through HTTP, as their users talk to them: the same
weights, the same streaming client, the same prompts (token ids), one server at a time.

Each elmd variant is a real `elmd serve` in its own process: this checkout with the
defaults ("editable"), with `--dtype bfloat16`, with each forced CPU kernel path
(--cpu-kernels), and a wheel install (--wheel-python: a venv's python with the built wheel
installed, run outside this checkout). A fresh install builds its native kernels in the
background and serves on ATen meanwhile, so measuring waits until /health says the build
is done. llama-server gets the model as llama.cpp's own q8_0 / q4_0 (benchmarks/llamacpp.py
writes the GGUF; the quantizer is the `llama-quantize` next to llama-server).

Per server, quant and prompt length (default 64 and 512 tokens), median over --repeats
of: time to the first streamed token, prompt tok/s (prompt tokens over that time: the
prefill plus one step and the HTTP round trip, the same for both), and decode tok/s
(tokens after the first event over their span; `ignore_eos`, so both generate
--decode-tokens, counted by the events' logprobs: `logprobs: 1` on both, since a fixture's
random tokens may decode to no text, which a server then holds back).
Prompts differ per request, so neither server's prompt cache helps. The machine's read
bandwidth is measured before and after, and ratios are taken within this one run.

    python benchmarks/http_peer.py --llama-server ~/llama.cpp/build/bin/llama-server
    python benchmarks/http_peer.py --llama-server BIN --wheel-python /tmp/wheel-venv/bin/python --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from common import REPO, OthersCpu, free_port, model_dirs, prompt_ids, wait_ready


@dataclass
class Server:
    """How to start one server: its command, environment and working directory."""

    label: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def elmd_server(label: str, python: str, model: Path, quant: str, home: Path, threads: int, in_repo: bool,
                kernels: str = "auto", extra: tuple[str, ...] = ()) -> Server:
    # Each install builds its kernels into a folder of its own: torch would rebuild a shared
    # one each time the other install's sources (another path) took a turn.
    extensions = home.parent / ("torch-extensions-" + ("editable" if in_repo else "wheel"))
    env = {"ELMD_HOME": str(home), "ELMD_CPU_KERNELS": kernels, "OMP_NUM_THREADS": str(threads),
           "TORCH_EXTENSIONS_DIR": str(extensions)}
    if in_repo:
        env["PYTHONPATH"] = str(REPO)
    cmd = [python, "-m", "elmd", "serve", "--model", str(model), "--backend", "torch", "--quant", quant,
           "--log-level", "warning", *extra]
    return Server(label, cmd, env, REPO if in_repo else Path(tempfile.gettempdir()))


def llama_server(binary: Path, gguf: Path, threads: int, context: int) -> Server:
    return Server("llama-server", [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                                   "-c", str(context), "-np", "1", "--host", "127.0.0.1", "--no-webui"])


def start(server: Server) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = server.cmd + ["--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(cmd, env={**env, **server.env}, cwd=server.cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    if wait_ready(base, proc) is None:
        stop(proc)
        raise RuntimeError(f"{server.label} did not become ready: {proc.stderr.read()[-500:]}")
    return proc, base


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def kernels_ready(base: str, timeout: float = 600) -> dict:
    """elmd's /health once no kernel build is running (a fresh install builds in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{base}/health", timeout=5).json()
        if not health.get("cpu_kernels_building") or time.monotonic() > deadline:
            return health
        time.sleep(1)


def streamed(base: str, model: str, ids: list[int], max_tokens: int) -> list[tuple[float, int]]:
    """(arrival time, tokens it carries) of each streamed event of one completion. Tokens
    are counted from the event's logprobs (one entry per token), since a fixture's random
    tokens may decode to no text, which a server then sends later or not at all."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 1, "stream": True}
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]
                logprobs = choices[0].get("logprobs") or {}
                tokens = len(logprobs.get("tokens") or logprobs.get("content") or [])
                if tokens:
                    events.append((time.perf_counter(), tokens))
    return events


def measure(base: str, model: str, vocab: int, args) -> dict:
    """Per prompt length: median time to first token, prompt tok/s, decode tok/s."""
    streamed(base, model, prompt_ids(16, vocab, 0), 8)  # warm-up
    out = {}
    for n in args.prompts:
        ttft, decode = [], []
        for i in range(args.repeats):
            t = time.perf_counter()
            events = streamed(base, model, prompt_ids(n, vocab, 1000 * n + i), args.decode_tokens)
            (first, first_tokens), (last, _) = events[0], events[-1]
            if sum(tokens for _, tokens in events) != args.decode_tokens or last == first:
                raise RuntimeError(f"{base}: {sum(tokens for _, tokens in events)} tokens in {len(events)} events, "
                                   f"expected {args.decode_tokens}")
            ttft.append(first - t)
            decode.append((args.decode_tokens - first_tokens) / (last - first))
        out[n] = {"ttft_s": statistics.median(ttft), "prompt_tok_s": n / statistics.median(ttft),
                  "decode_tok_s": statistics.median(decode)}
    return out


def warm(server: Server) -> None:
    """Start `server` once and wait out its kernel build, so no build runs beside a measurement."""
    proc, base = start(server)
    try:
        kernels_ready(base)
    finally:
        stop(proc)


def run(server: Server, vocab: int, args) -> dict:
    proc, base = start(server)
    try:
        info = {}
        if server.label != "llama-server":
            health = kernels_ready(base)
            info = {"cpu_kernels": health.get("cpu_kernels"), "cpu_kernels_reason": health.get("cpu_kernels_reason")}
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        own = psutil.Process(proc.pid)
        with OthersCpu() as others:
            before = sum(own.cpu_times()[:4])
            rates = measure(base, model, vocab, args)
            server_seconds = sum(own.cpu_times()[:4]) - before
        # OthersCpu counts a running child as another process: take the server's share out
        others_pct = max(0.0, others.pct - 100 * server_seconds / (others.seconds * (os.cpu_count() or 1)))
        return {"server": server.label, **info, "others_cpu_pct": others_pct, "rates": rates}
    finally:
        stop(proc)


def print_table(rows: list[dict], prompts: list[int], bandwidth: float) -> None:
    print(f"\nread bandwidth: {bandwidth:.1f} GB/s (this run); tok/s through HTTP, medians")
    head = "".join(f"  {n:>4}-tok prompt: ttft ms  prompt  decode" for n in prompts)
    print(f"{'quant':6} {'server':34} {'kernels':8}{head}  others%")
    for r in rows:
        cells = "".join(f"  {'':14}{v['ttft_s'] * 1e3:8.0f}{v['prompt_tok_s']:8.0f}{v['decode_tok_s']:8.1f}"
                        for v in (r["rates"][n] for n in prompts))
        print(f"{r['quant']:6} {r['server']:34} {r.get('cpu_kernels') or '-':8}{cells}  {r['others_cpu_pct']:6.1f}")


def ratios(rows: list[dict], prompts: list[int]) -> list[dict]:
    """Each elmd row over llama-server (same quant), and the wheel over the editable install."""
    out = []
    for r in rows:
        peer = next((p for p in rows if p["quant"] == r["quant"] and p["server"] == "llama-server"), None)
        base = next((p for p in rows if p["quant"] == r["quant"] and p["server"] == "elmd editable"), None)
        for name, ref in (("llama-server", peer), ("elmd editable", base)):
            if ref is None or ref is r or r["server"] == "llama-server":
                continue
            out.append({"quant": r["quant"], "server": r["server"], "over": name,
                        **{f"{k}@{n}": r["rates"][n][k] / ref["rates"][n][k]
                           for n in prompts for k in ("prompt_tok_s", "decode_tok_s")}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server", type=Path, required=True, help="llama.cpp's llama-server binary")
    p.add_argument("--wheel-python", help="python of a venv with elmd installed from its wheel")
    p.add_argument("--bf16", action="store_true", help="also elmd serve --dtype bfloat16")
    p.add_argument("--cpu-kernels", nargs="+", default=["auto"], choices=["auto", "avx512", "avx512-vnni", "avx2", "aten"])
    p.add_argument("--model", default="270M", help="a fixture shape or a model directory")
    p.add_argument("--quants", nargs="+", default=["int8", "int4"], choices=["none", "bf16", "int8", "int4"])
    p.add_argument("--prompts", nargs="+", type=int, default=[64, 512])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "elmd-bench")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)

    import llamacpp
    from matmul_speed import read_bandwidth_gbs

    [model] = model_dirs([args.model], args.work_dir).values()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    quantizer = args.llama_server.parent / "llama-quantize"
    bandwidths = [read_bandwidth_gbs()]
    rows = []
    for quant in args.quants:
        home = args.work_dir / "http-peer-home"
        servers = [elmd_server(f"elmd editable{'' if k == 'auto' else ' ' + k}", sys.executable, model, quant, home,
                               args.threads, True, k) for k in args.cpu_kernels]
        if args.bf16:
            servers.append(elmd_server("elmd editable --dtype bfloat16", sys.executable, model, quant, home,
                                       args.threads, True, extra=("--dtype", "bfloat16")))
        if args.wheel_python:
            servers.append(elmd_server("elmd wheel", args.wheel_python, model, quant, home, args.threads, False))
        gguf = llamacpp.gguf_for(model, quant, args.work_dir, args.threads, quantizer)
        servers.append(llama_server(args.llama_server, gguf, args.threads, 2048))
        for server in servers:
            if server.label != "llama-server":
                warm(server)
        for server in servers:
            row = {"quant": quant, **run(server, vocab, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    bandwidths.append(read_bandwidth_gbs())
    bandwidth = statistics.median(bandwidths)
    print_table(rows, args.prompts, bandwidth)
    table = ratios(rows, args.prompts)
    print("\nratios (same run):")
    for r in table:
        print(f"  {r['quant']:5} {r['server']:34} / {r['over']:14} "
              + "  ".join(f"{k} {v:.2f}x" for k, v in r.items() if "@" in k))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"read_bandwidth_gbs": bandwidth, "threads": args.threads, "model": str(model), "rows": rows,
              "ratios": table, "llama_server": str(args.llama_server)}
    (args.out / "http_peer.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out / 'http_peer.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
