"""Batch-1 and batch-8 decode on a CUDA GPU: eager, CUDA graphs, and graphs of a
torch.compile'd step, on the 270M-shaped fixture in bf16 (issue 9's GPU target: 1,500 tok/s
at batch 1 on an H100/H200). One prepared run for a lent GPU machine:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT          # ~3-5 min on an H200

Measures, in one process: the device-to-device copy bandwidth and the decode limit it
implies; the model's decode step alone (eager, replayed graph, compiled + graph) with the
graph's logits checked against eager; decode through the engine (scheduler, sampling) with
and without graphs, at batch 1 and 8 concurrent requests, and whether greedy tokens agree;
and a profiler table of the eager and replayed steps' kernels. Prints a table and writes
gpu.json (and the profiles) into --out. Needs only torch, safetensors, tokenizers and jinja2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench import prompt_ids  # noqa: E402

from elmd.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from elmd.engine.load import load_engine  # noqa: E402
from elmd.engine.torch_backend import load_quantized_model  # noqa: E402
from elmd.fixtures import write_checkpoint  # noqa: E402


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9


def step_inputs(model, batch: int, prompt: int):
    """Fill `batch` cache rows with a `prompt`-token prompt each; return the next step's inputs."""
    vocab = model.cfg.vocab_size
    for slot in range(batch):
        ids = torch.tensor([prompt_ids(prompt, vocab, slot)], device="cuda")
        model.layers_forward(ids, torch.arange(prompt, device="cuda")[None], torch.tensor([slot], device="cuda"), span=prompt)
    tokens = torch.tensor([[prompt_ids(1, vocab, 99 + slot)[0]] for slot in range(batch)], device="cuda")
    positions = torch.full((batch, 1), prompt, device="cuda")
    return tokens, positions, torch.arange(batch, device="cuda")


def time_steps(run, batch: int, steps: int) -> float:
    """Tokens per second of `steps` back-to-back calls of run() (the last one synchronized)."""
    run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def profile_table(run, steps: int, path: Path) -> str:
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    path.write_text(table)
    return table


def step_benchmarks(model_dir: Path, args, out: Path) -> dict:
    """The decode step alone, without the scheduler: what the graphs buy and what remains."""
    model = load_quantized_model(model_dir, "none", torch.bfloat16, "cuda")
    model.setup_caches(8, 256)
    results: dict = {}
    with torch.inference_mode():
        inputs = {b: step_inputs(model, b, args.prompt_tokens) for b in (1, 8)}
        span = args.prompt_tokens + 1
        variants = {"eager": None, "graph": DecodeGraphs(model)}
        if args.compile:
            variants["compiled+graph"] = DecodeGraphs(model, step=torch.compile(model.layers_forward, fullgraph=True))
        for batch, (tokens, positions, slots) in inputs.items():
            eager = model.layers_forward(tokens, positions, slots, span=span)
            for name, graphs in variants.items():
                t = time.perf_counter()
                try:
                    if graphs is None:
                        run = lambda: model.layers_forward(tokens, positions, slots, span=span)  # noqa: E731
                    else:
                        run = lambda g=graphs: g(tokens, positions, slots)  # noqa: E731
                    logits = run()  # captures (and compiles) on the first call
                    setup_s = time.perf_counter() - t
                    diff = ((logits.float() - eager.float()).abs().max() / eager.float().abs().max()).item()
                    results[f"step {name} b{batch}"] = {"tok_s": time_steps(run, batch, args.steps), "setup_s": setup_s,
                                                   "max_rel_diff_vs_eager": diff}
                except Exception as e:  # report and go on: one failed variant must not lose the others
                    results[f"step {name} b{batch}"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"step {name} b{batch}: {results[f'step {name} b{batch}']}", flush=True)
        tokens, positions, slots = inputs[1]
        print(profile_table(lambda: model.layers_forward(tokens, positions, slots, span=span), 20, out / "profile-eager.txt"))
        print(profile_table(lambda: variants["graph"](tokens, positions, slots), 20, out / "profile-graph.txt"))
    results["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return results


def engine_benchmarks(model_dir: Path, args) -> dict:
    """Decode through the engine (scheduler, sampling, channels), as the daemon runs it."""
    results: dict = {}
    tokens_by_mode = {}
    for graphs in (False, True):
        name = "graph" if graphs else "eager"
        engine = load_engine(model_dir, backend="torch", dtype="bfloat16", device="cuda", slots=8, cuda_graphs=graphs)
        vocab = engine.tokenizer.vocab_size
        params = engine.params(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)

        def stamps_of(seed: int, into: list) -> None:
            for chunk in engine.stream(prompt_ids(args.prompt_tokens, vocab, seed), params):
                into += [(time.perf_counter(), t) for t in chunk.token_ids]

        warm: list = []
        stamps_of(0, warm)  # captures the batch-1 graph
        rates = []
        for i in range(3):
            one: list = []
            stamps_of(10 + i, one)
            rates.append((len(one) - 1) / (one[-1][0] - one[0][0]))
        tokens_by_mode[name] = [t for _, t in one]
        streams: list[list] = [[] for _ in range(8)]
        threads = [threading.Thread(target=stamps_of, args=(20 + i, streams[i])) for i in range(8)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        total = sum(len(s) for s in streams)
        results[f"engine {name} b1"] = {"tok_s": sorted(rates)[1]}
        results[f"engine {name} 8 concurrent"] = {"tok_s": total / (time.perf_counter() - t)}
        engine.close()
        print(f"engine {name}: {results[f'engine {name} b1']} / {results[f'engine {name} 8 concurrent']}", flush=True)
    same = sum(a == b for a, b in zip(tokens_by_mode["eager"], tokens_by_mode["graph"]))
    results["greedy tokens equal, eager vs graph"] = f"{same}/{len(tokens_by_mode['eager'])}"
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--shape", default="270M")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["copy_gbs"] = copy_bandwidth_gbs()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model_dir = write_checkpoint(Path(tmp) / args.shape, args.shape, seed=0, dtype="bfloat16")
        print(f"fixture written in {time.perf_counter() - t:.1f} s", flush=True)
        report.update(step_benchmarks(model_dir, args, args.out))
        report.update(engine_benchmarks(model_dir, args))
    limit = report["copy_gbs"] * 1e9 / report["weights_bytes"]
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['device']}, torch {report['torch']}: copy {report['copy_gbs']:.0f} GB/s, "
          f"{report['weights_bytes'] / 1e6:.0f} MB of weights per step -> batch-1 limit {limit:,.0f} tok/s")
    print(f"{'measurement':32} {'tok/s':>10} {'% of limit':>10}  notes")
    for key, value in report.items():
        if isinstance(value, dict):
            if "error" in value:
                print(f"{key:32} {'-':>10} {'':>10}  {value['error'][:80]}")
                continue
            notes = "  ".join(f"{k} {v:.3g}" for k, v in value.items() if k != "tok_s")
            share = f"{100 * value['tok_s'] / limit:.0f}" if key.endswith("b1") else ""  # the limit is batch 1's
            print(f"{key:32} {value['tok_s']:>10,.0f} {share:>10}  {notes}")
    print(f"greedy tokens equal, eager vs graph: {report['greedy tokens equal, eager vs graph']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
