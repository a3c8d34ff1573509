"""elmd's benchmark suite: what a local user feels, per model, backend and quantization.

For each model and quantization, in a fresh process each (so load time and peak memory
are honest): load time, peak and settled resident memory, prompt tok/s on a 512-token
prompt, decode tok/s at batch 1 (64-token prompt, 128 new tokens); then through the
HTTP API of a real `elmd serve`: daemon start to /health ready and time to first token.
The machine's read bandwidth is measured in the same run, and each decode figure is
printed beside the bandwidth limit (bandwidth / bytes of weights read per token).

With --cpu-kernels, each elmd row is measured once per native kernel path (passed to the
child as ELMD_CPU_KERNELS; the row names the path that really ran) and the paths' ratios
to the first one listed are printed.

With --llamacpp, llama.cpp (the `llamacpp` extra) is measured right after elmd on the same
weights (benchmarks/llamacpp.py), and the ratios elmd / llama.cpp are printed per model
and quantization.

    python benchmarks/bench.py                        # 270M and 1.1B fixtures, offline model
    python benchmarks/bench.py --models 270M --quants none int4 --no-http
    python benchmarks/bench.py --models 270M --quants bf16 int8 int4 --llamacpp --no-http
    python benchmarks/bench.py --models 270M --quants int8 int4 --llamacpp --no-http --long-context 1900
    python benchmarks/bench.py --models 270M --quants bf16 int8 int4 --no-http --cpu-kernels avx512 avx2 aten

Writes results.json and results.png (with matplotlib) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common import (REPO, OthersCpu, add_rate_options, child_result, free_port, model_dirs, peak_rss_bytes,
                    rate_options, token_rates, wait_ready)



# ---- one model, one quantization, in its own process ---------------------------------


def run_child(args) -> dict:
    import psutil
    import torch

    from elmd.engine.kernels import native
    from elmd.engine.load import load_engine

    torch.set_num_threads(args.threads)
    native.load()  # a first build of the kernels compiles here, not beside the measurement
    t = time.perf_counter()
    engine = load_engine(args.model_dir, backend="torch", quant=args.quant, dtype=args.dtype)
    load_s = time.perf_counter() - t
    rss_loaded = psutil.Process().memory_info().rss
    info = engine.backend.info
    weights = {t.data_ptr(): t.numel() * t.element_size() for t in engine.backend.model.state_dict().values()}
    vocab = engine.tokenizer.vocab_size

    def generate(ids, max_tokens):
        params = engine.params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        stamps = []
        for chunk in engine.stream(ids, params):
            stamps += [time.perf_counter()] * len(chunk.token_ids)
        return stamps

    rates = token_rates(generate, vocab, args)
    engine.close()
    kernels, why = native.kernel_path()
    return {
        "cpu_kernels": kernels,
        "cpu_kernels_why": why,
        "load_s": load_s,
        "weights_bytes": sum(weights.values()),  # read once per decoded token; caches excluded
        "device": info.device,
        "dtype": info.dtype,
        "rss_loaded_bytes": rss_loaded,
        "rss_peak_bytes": peak_rss_bytes(),
        **rates,
    }


def measure_in_process(model_dir: Path, quant: str, args, cpu_kernels: str = "auto") -> dict:
    return child_result([sys.executable, __file__, "--child", str(model_dir), "--quants", quant, "--dtype", args.dtype,
                         *rate_options(args)], env={"ELMD_CPU_KERNELS": cpu_kernels})


# ---- through the HTTP API of a real daemon -------------------------------------------


def measure_http(model_dir: Path, quant: str, args, home: Path, cpu_kernels: str = "auto") -> dict:
    """Daemon start to /health ready, then median time to the first streamed token."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "ELMD_HOME": str(home), "ELMD_CPU_KERNELS": cpu_kernels}
    cmd = [sys.executable, "-m", "elmd", "serve", "--model", str(model_dir), "--backend", "torch",
           "--quant", quant, "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_ready(base, server)
        if ready_s is None:
            why = server.stderr.read().strip().splitlines()[-1:] if server.poll() is not None else ["timeout"]
            return {"http_error": "daemon not ready: " + " ".join(why)}
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        ttfts = []
        for i in range(args.repeats + 1):
            body = {"model": model, "prompt": f"Request {i}: " + "the quick brown fox jumps over the lazy dog " * 6,
                    "max_tokens": 8, "temperature": 0, "stream": True}
            t0 = time.perf_counter()
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data:") and '"text"' in line:
                        ttfts.append(time.perf_counter() - t0)
                        break
        return {"ready_s": ready_s, "ttft_s": statistics.median(ttfts[1:])}  # the first warms up
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


# ---- models, the table, the chart ----------------------------------------------------

def print_table(rows: list[dict], bandwidth: float) -> None:
    print(f"\nread bandwidth: {bandwidth:.1f} GB/s (median of the runs around the measurements)")
    head = (f"{'model':24} {'quant':6} {'engine':9} {'kernels':7} {'weights':>8} {'load s':>6} {'RSS MB':>7} {'peak MB':>7} "
            f"{'prompt t/s':>10} {'decode t/s':>10} {'ceiling':>8} {'at size':>7} {'%':>4} {'others%':>7} {'ready s':>7} "
            f"{'TTFT ms':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:24} {r['quant']:6} {r['engine']:9} {r.get('cpu_kernels', '-'):7} error: {r['error']}")
            continue
        http = f"{r['ready_s']:>7.2f} {r['ttft_s'] * 1e3:>7.0f}" if "ttft_s" in r else f"{'-':>7} {'-':>7}"
        if "http_error" in r:
            http += f"  ({r['http_error']})"
        print(f"{r['model']:24} {r['quant']:6} {r['engine']:9} {r.get('cpu_kernels', '-'):7} {r['weights_bytes'] / 1e6:>6.0f}MB {r['load_s']:>6.2f} "
              f"{r['rss_loaded_bytes'] / 1e6:>7.0f} {r['rss_peak_bytes'] / 1e6:>7.0f} {r['prompt_tok_s']:>10.0f} "
              f"{r['decode_tok_s']:>10.1f} {r['ceiling_tok_s']:>8.0f} {r['ceiling_at_size_tok_s']:>7.0f} "
              f"{100 * r['decode_tok_s'] / r['ceiling_at_size_tok_s']:>4.0f} "
              f"{r['others_cpu_pct']:>7.0f} {http}")
    print("ceiling: decode tok/s if the weights streamed at the 1 GiB read bandwidth (DRAM); at size: at the\n"
          "bandwidth of a stream as large as the weights, which the last-level cache partly holds between\n"
          "tokens, measured right after the model's rows; %: decode over that second limit")
    if any(r.get("others_cpu_pct", 0) > 10 for r in rows):
        print("others%: CPU taken by other processes during the row; above ~10% its figures are unreliable")


def ratios(rows: list[dict]) -> list[dict]:
    """elmd / llama.cpp for decode and prompt tok/s, per model and quantization measured by both."""
    peers = {(r["model"], r["quant"]): r for r in rows if r["engine"] == "llama.cpp" and "error" not in r}
    out = []
    for r in rows:
        peer = peers.get((r["model"], r["quant"]))
        if r["engine"] == "elmd" and "error" not in r and peer:
            ratio = {"model": r["model"], "quant": r["quant"], "cpu_kernels": r["cpu_kernels"], "llama_cpp_type": peer["dtype"],
                     "decode": r["decode_tok_s"] / peer["decode_tok_s"], "prompt": r["prompt_tok_s"] / peer["prompt_tok_s"]}
            if "long_decode_tok_s" in r and "long_decode_tok_s" in peer:
                ratio["long_decode"] = r["long_decode_tok_s"] / peer["long_decode_tok_s"]
                ratio["long_prompt"] = r["long_prompt_tok_s"] / peer["long_prompt_tok_s"]
            out.append(ratio)
    return out


def kernel_ratios(rows: list[dict]) -> list[dict]:
    """Each elmd row's decode and prompt tok/s over the first kernel path measured for its
    model and quantization (the first of --cpu-kernels), in the same run."""
    first: dict[tuple[str, str], dict] = {}
    out = []
    for r in rows:
        if r["engine"] != "elmd" or "error" in r:
            continue
        base = first.setdefault((r["model"], r["quant"]), r)
        out.append({"model": r["model"], "quant": r["quant"], "cpu_kernels": r["cpu_kernels"], "over": base["cpu_kernels"],
                    "decode": r["decode_tok_s"] / base["decode_tok_s"], "prompt": r["prompt_tok_s"] / base["prompt_tok_s"]})
    return out


def print_kernel_ratios(table: list[dict]) -> None:
    print("\nkernel paths, same weights, same run: tok/s over the first path's")
    head = f"{'model':24} {'quant':6} {'kernels':7} {'over':7} {'decode':>7} {'prompt':>7}"
    print(head)
    print("-" * len(head))
    for t in table:
        print(f"{t['model']:24} {t['quant']:6} {t['cpu_kernels']:7} {t['over']:7} {t['decode']:>6.2f}x {t['prompt']:>6.2f}x")


def print_long_context(rows: list[dict], tokens: int) -> None:
    print(f"\nafter a {tokens}-token prompt: its prompt tok/s, then decode tok/s at batch 1")
    head = f"{'model':24} {'quant':6} {'engine':9} {'prompt t/s':>10} {'decode t/s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "long_decode_tok_s" in r:
            print(f"{r['model']:24} {r['quant']:6} {r['engine']:9} {r['long_prompt_tok_s']:>10.0f} {r['long_decode_tok_s']:>10.1f}")


def print_ratios(table: list[dict]) -> None:
    print("\nelmd / llama.cpp, same weights, same run (>= 1.0: elmd is faster)")
    long = any("long_decode" in t for t in table)
    head = f"{'model':24} {'quant':6} {'kernels':7} {'llama.cpp':9} {'decode':>7} {'prompt':>7}" + (f" {'long decode':>11} {'long prompt':>11}" if long else "")
    print(head)
    print("-" * len(head))
    for t in table:
        extra = f" {t['long_decode']:>10.2f}x {t['long_prompt']:>10.2f}x" if "long_decode" in t else ""
        print(f"{t['model']:24} {t['quant']:6} {t['cpu_kernels']:7} {t['llama_cpp_type']:9} {t['decode']:>6.2f}x {t['prompt']:>6.2f}x{extra}")


def chart(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if "error" not in r]
    labels = [f"{r['model']}\n{r['quant']}\n{r['engine']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    xs = range(len(rows))
    ax.bar(xs, [r["ceiling_at_size_tok_s"] for r in rows], color="#dddddd", label="read-bandwidth limit at the weights' size")
    ax.bar(xs, [r["decode_tok_s"] for r in rows], width=0.5, color="#3a6ea5", label="decode, batch 1")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("tokens / s")
    ax.set_title("decode speed vs the machine's read-bandwidth limit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["270M", "1.1B", "offline"],
                   help="fixture shapes (270M, 450M, 1.1B, 3B), 'offline' (the packaged model), or model directories")
    p.add_argument("--quants", nargs="+", default=["none", "bf16", "int8", "int4"])
    p.add_argument("--dtype", default="auto", help="activation dtype of the torch backend")
    add_rate_options(p)
    p.add_argument("--cpu-kernels", nargs="+", default=["auto"], choices=["auto", "avx512", "avx512-vnni", "avx2", "aten"],
                   help="native CPU kernel paths to measure elmd on, each in its own child (ELMD_CPU_KERNELS)")
    p.add_argument("--no-http", action="store_true", help="skip the daemon start and time-to-first-token runs")
    p.add_argument("--llamacpp", action="store_true",
                   help="also measure llama.cpp on the same weights, right after elmd, and print the ratios")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "elmd-bench")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        args.model_dir, args.quant = args.child, args.quants[0]
        print(json.dumps(run_child(args)))
        return 0

    import llamacpp
    from matmul_speed import read_bandwidth_gbs  # torch: kept out of the children that only need this file's helpers

    if args.llamacpp and not llamacpp.available():
        p.exit(2, f"--llamacpp: {llamacpp.INSTALL_HINT}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    models = model_dirs(args.models, args.work_dir)
    bandwidths = [read_bandwidth_gbs()]
    rows = []
    for label, path in models.items():
        for quant in args.quants:
            measured = []
            for kernels in args.cpu_kernels:
                with OthersCpu() as others:
                    row = {"model": label, "quant": quant, "engine": "elmd", "path": str(path),
                           **measure_in_process(path, quant, args, kernels)}
                row["others_cpu_pct"] = others.pct
                bandwidths.append(read_bandwidth_gbs())
                if "error" not in row and not args.no_http:
                    row.update(measure_http(path, quant, args, args.work_dir / "home", kernels))
                measured.append(row)
            if args.llamacpp:
                with OthersCpu() as others:
                    peer = {"model": label, "quant": quant, "engine": "llama.cpp", "path": str(path),
                            **llamacpp.measure_in_process(path, quant, args)}
                measured.append({**peer, "others_cpu_pct": others.pct})
                bandwidths.append(read_bandwidth_gbs())
            for r in measured:
                if "weights_bytes" in r:
                    r["bandwidth_at_size_gbs"] = read_bandwidth_gbs(r["weights_bytes"])
                    r["ceiling_at_size_tok_s"] = r["bandwidth_at_size_gbs"] * 1e9 / r["weights_bytes"]
                rows.append(r)
                print(f"{label} {quant} {r['engine']}: "
                      + (r["error"] if "error" in r else ", ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, float))),
                      flush=True)
    bandwidth = statistics.median(bandwidths)
    for r in rows:
        if "weights_bytes" in r:
            r["ceiling_tok_s"] = bandwidth * 1e9 / r["weights_bytes"]
    print_table(rows, bandwidth)
    if args.long_context:
        print_long_context(rows, args.long_context)
    result = {"read_bandwidth_gbs": bandwidth, "bandwidth_runs_gbs": bandwidths, "threads": args.threads,
              "machine": os.uname().machine, "cpus": os.cpu_count(), "rows": rows}
    if len(args.cpu_kernels) > 1:
        result["kernel_ratios"] = kernel_ratios(rows)
        print_kernel_ratios(result["kernel_ratios"])
    if args.llamacpp:
        result["llama_cpp_version"] = llamacpp.version()
        result["elmd_over_llama_cpp"] = ratios(rows)
        print_ratios(result["elmd_over_llama_cpp"])
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    png = chart(rows, args.out / "results.png")
    print(f"\nwrote {args.out / 'results.json'}" + (f" and {png}" if png else " (no matplotlib: no chart)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
