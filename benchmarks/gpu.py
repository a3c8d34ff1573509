"""Batch-1 and batch-8 decode on a CUDA GPU: eager, CUDA graphs, and graphs of a
torch.compile'd step, on the 270M-shaped fixture in bf16 (issue 9's GPU target: 1,500 tok/s
at batch 1 on an H100/H200). One prepared run for a lent GPU machine:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT          # ~7 min on an H100

Measures, in one process: the device-to-device copy bandwidth and the decode limit it
implies; the model's decode step alone (eager, replayed graph, compiled with ATen's forms +
graph, compiled as `compile_decode` does + graph) with each one's logits checked against
eager; decode through the engine (scheduler, sampling) eager, with graphs and with compiled
graphs, at batch 1 and 8 concurrent requests, and whether greedy tokens agree; and profiler
tables of the steps' kernels. Measurements that would start after --budget-s are skipped;
gpu.json is rewritten after each one. Needs only torch, safetensors, tokenizers and jinja2.

On an H100 (torch 2.11) the tuned compile of `compile_decode` took 122 s at batch 1, and
over 200 s more at batch 8, so the step measures it at batch 1 only.
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

from common import prompt_ids  # noqa: E402

from elmd.engine.cuda_graphs import DecodeGraphs, compiled_step  # noqa: E402
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
        model.forward(ids, torch.arange(prompt, device="cuda")[None], torch.tensor([slot], device="cuda"), span=prompt)
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


class Report(dict):
    """Results by measurement, written to gpu.json after each one; measurements past the
    deadline are skipped (a lent GPU's time is short, and what ran must come back)."""

    def __init__(self, path: Path, budget_s: float, **facts):
        super().__init__(facts)
        self.path, self.deadline = path, time.perf_counter() + budget_s

    def measure(self, key: str, fn) -> None:
        if time.perf_counter() > self.deadline:
            self[key] = {"error": "skipped: past the time budget"}
        else:
            try:
                self[key] = fn()
            except Exception as e:  # report and go on: one failed variant must not lose the others
                self[key] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{key}: {self[key]}", flush=True)
        self.path.write_text(json.dumps(self, indent=2))


def step_benchmarks(model_dir: Path, args, report: Report) -> None:
    """The decode step alone, without the scheduler: what graphs and compiling buy, and what
    remains. Variants run in order, since compiled_step's reductions change the model's
    compiled form for good: eager, graph, compiled (ATen forms), compiled (reductions, tuned:
    what `compile_decode` runs)."""
    model = load_quantized_model(model_dir, "none", torch.bfloat16, "cuda")
    model.setup_caches(8, 256)
    variants = {"eager": (lambda: None, (1, 8)), "graph": (lambda: DecodeGraphs(model), (1, 8))}
    if args.compile:
        variants["compiled aten+graph"] = (lambda: DecodeGraphs(model, compiled_step(model, False, False)), (1, 8))
        variants["compiled+graph"] = (lambda: DecodeGraphs(model, compiled_step(model)), (1,))
    with torch.inference_mode():
        inputs = {b: step_inputs(model, b, args.prompt_tokens) for b in (1, 8)}
        span = args.prompt_tokens + 1
        eager = {b: model.forward(*inputs[b], span=span) for b in inputs}
        runs = {}
        for name, (make, batches) in variants.items():
            graphs = make()
            for batch in batches:
                if graphs is None:
                    run = lambda i=inputs[batch]: model.forward(*i, span=span)  # noqa: E731
                else:
                    run = lambda g=graphs, i=inputs[batch]: g(*i)  # noqa: E731

                def measure(run=run, batch=batch):
                    t = time.perf_counter()
                    logits = run()  # captures (and compiles) on the first call
                    setup_s = time.perf_counter() - t
                    ref = eager[batch].float()
                    diff = ((logits.float() - ref).abs().max() / ref.abs().max()).item()
                    return {"tok_s": time_steps(run, batch, args.steps), "setup_s": setup_s, "max_rel_diff_vs_eager": diff}

                report.measure(f"step {name} b{batch}", measure)
                if batch == 1 and "error" not in report[f"step {name} b{batch}"]:
                    runs[name] = run
        for name, run in runs.items():
            print(profile_table(run, 20, report.path.parent / f"profile-{name.replace('+', '-').replace(' ', '-')}.txt"))
    report["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())


def engine_benchmarks(model_dir: Path, args, report: Report) -> None:
    """Decode through the engine (scheduler, sampling, channels), as the daemon runs it: eager,
    replayed graphs, and graphs of the compiled step. The first request captures (and compiles)
    batch 1, the first concurrent round every batch size up to 8: their wall times are the
    warm-up a daemon pays once. Greedy tokens are compared with eager's."""
    modes = {"graph": {"cuda_graphs": True}, "eager": {"cuda_graphs": False}}
    if args.compile:
        modes["compiled graph"] = {"cuda_graphs": True, "compile_decode": True}
    engines, tokens_by_mode = {}, {}
    params = dict(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)

    def stamps_of(engine, seed: int, into: list) -> None:
        ids = prompt_ids(args.prompt_tokens, engine.tokenizer.vocab_size, seed)
        for chunk in engine.stream(ids, engine.params(**params)):
            into += [(time.perf_counter(), t) for t in chunk.token_ids]

    def concurrent(engine, seed: int) -> float:
        streams: list[list] = [[] for _ in range(8)]
        threads = [threading.Thread(target=stamps_of, args=(engine, seed + i, streams[i])) for i in range(8)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return sum(len(s) for s in streams) / (time.perf_counter() - t)

    def batch_one(name: str) -> dict:
        engine = engines[name] = load_engine(model_dir, backend="torch", dtype="bfloat16", device="cuda", slots=8, **modes[name])
        t = time.perf_counter()
        stamps_of(engine, 0, [])
        first = time.perf_counter() - t
        rates = []
        for i in range(3):
            one: list = []
            stamps_of(engine, 10 + i, one)
            rates.append((len(one) - 1) / (one[-1][0] - one[0][0]))
        tokens_by_mode[name] = [t for _, t in one]
        return {"tok_s": sorted(rates)[1], "first_request_s": first}

    def eight(name: str) -> dict:
        t = time.perf_counter()
        concurrent(engines[name], 100)
        first = time.perf_counter() - t
        return {"tok_s": concurrent(engines[name], 20), "first_round_s": first}

    for name in modes:
        report.measure(f"engine {name} b1", lambda: batch_one(name))
        if name != "compiled graph" and name in engines:  # the compiled one's ramp is slow: last
            report.measure(f"engine {name} 8 concurrent", lambda: eight(name))
    if "compiled graph" in engines:
        report.measure("engine compiled graph 8 concurrent", lambda: eight("compiled graph"))
    for engine in engines.values():
        engine.close()
    eager = tokens_by_mode.get("eager", [])
    for name, tokens in tokens_by_mode.items():
        if name != "eager":
            same = next((i for i, (a, b) in enumerate(zip(eager, tokens)) if a != b), len(eager))
            report[f"greedy tokens equal to eager, {name}"] = f"first {same} of {len(eager)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--shape", default="270M")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--budget-s", type=float, default=420, help="skip measurements that would start later")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu.json", args.budget_s, device=torch.cuda.get_device_name(), torch=torch.__version__,
                    copy_gbs=copy_bandwidth_gbs())
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model_dir = write_checkpoint(Path(tmp) / args.shape, args.shape, seed=0, dtype="bfloat16")
        print(f"fixture written in {time.perf_counter() - t:.1f} s", flush=True)
        step_benchmarks(model_dir, args, report)
        engine_benchmarks(model_dir, args, report)
    limit = report["copy_gbs"] * 1e9 / report["weights_bytes"]
    report.path.write_text(json.dumps(report, indent=2))
    print(f"\n{report['device']}, torch {report['torch']}: copy {report['copy_gbs']:.0f} GB/s, "
          f"{report['weights_bytes'] / 1e6:.0f} MB of weights per step -> batch-1 limit {limit:,.0f} tok/s")
    print(f"{'measurement':36} {'tok/s':>10} {'% of limit':>10}  notes")
    for key, value in report.items():
        if isinstance(value, dict):
            if "error" in value:
                print(f"{key:36} {'-':>10} {'':>10}  {value['error'][:80]}")
                continue
            notes = "  ".join(f"{k} {v:.3g}" for k, v in value.items() if k != "tok_s")
            share = f"{100 * value['tok_s'] / limit:.0f}" if key.endswith("b1") else ""  # the limit is batch 1's
            print(f"{key:36} {value['tok_s']:>10,.0f} {share:>10}  {notes}")
    for key, value in report.items():
        if key.startswith("greedy"):
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
