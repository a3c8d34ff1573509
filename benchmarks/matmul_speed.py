"""Matmul kernels on OpenELM's exact layer shapes: which one streams weights fastest.

Decode at batch 1 is a chain of matrix-vector products whose speed is set by how
many bytes of weights a kernel reads per second, so each kernel is reported in GB/s
beside the machine's read bandwidth measured in the same run, and as the tok/s its
matmuls alone would allow. Larger M (continuous batching, prefill) is reported as
tokens/s through the same weights.

    python benchmarks/matmul_speed.py --shape 270M --m 1 4 16 64 512 --threads 2 --only bf16 int4

On a shared machine, kernels whose OpenMP regions wait on a descheduled thread (ATen's,
oneDNN's) slow down far more than the load suggests; compare ratios from one run. With
THP_MEM_ALLOC_ENABLE=1 torch backs large tensors with huge pages: on the 2-core dev VM
that raised both the measured bandwidth (21 -> 29 GB/s) and the native int8 pass (+12-18%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = Path("/work/shared/reference/openelm-configs.json")
HUB_IDS = {"270M": "apple/OpenELM-270M-Instruct", "450M": "apple/OpenELM-450M-Instruct",
           "1.1B": "apple/OpenELM-1_1B-Instruct", "3B": "apple/OpenELM-3B-Instruct"}


def layer_shapes(shape: str, with_head: bool) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear a token passes through, in order."""
    cfg = json.loads(CONFIGS.read_text())[HUB_IDS[shape]]
    d, hd = cfg["model_dim"], cfg["head_dim"]
    shapes = []
    for q, kv, ffn in zip(cfg["num_query_heads"], cfg["num_kv_heads"], cfg["_derived"]["ffn_dims"]):
        shapes += [((q + 2 * kv) * hd, d), (d, q * hd), (2 * ffn, d), (d, ffn)]
    if with_head:
        shapes.append((cfg["vocab_size"], d))
    return shapes


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Median GB/s of summing an `nbytes` float32 array: the ceiling for streaming weights
    that large (1 GiB: from DRAM; smaller arrays may partly stay in the last-level cache
    between passes, as a model's weights do between tokens)."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(times) / 1e9


class Kernel:
    """One way of computing x @ W.T for every layer; prepared once, then timed."""

    name = ""
    act_dtype = torch.bfloat16

    def prepare(self, weights: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def run(self, xs: list[torch.Tensor]) -> None:
        raise NotImplementedError


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Dense(Kernel):
    def __init__(self, dtype):
        self.dtype, self.act_dtype = dtype, dtype
        self.name = f"F.linear {str(dtype).removeprefix('torch.')}"

    def prepare(self, weights):
        self.w = [w.to(self.dtype).contiguous() for w in weights]

    def nbytes(self):
        return _bytes(self.w)

    def run(self, xs):
        for x, w in zip(xs, self.w):
            F.linear(x, w)


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8PackMM(Kernel):
    name = "aten _weight_int8pack_mm"

    def prepare(self, weights):
        self.q = []
        for w in weights:
            q, s = int8_per_channel(w.float())
            self.q.append((q.contiguous(), s.to(torch.bfloat16)))

    def nbytes(self):
        return _bytes(t for pair in self.q for t in pair)

    def run(self, xs):
        for x, (q, s) in zip(xs, self.q):
            torch.ops.aten._weight_int8pack_mm(x, q, s)


class Int4PackMM(Kernel):
    def __init__(self, group_size):
        self.group_size = group_size
        self.name = f"aten _weight_int4pack_mm_for_cpu g{group_size}"

    def prepare(self, weights):
        g = self.group_size
        self.q = []
        for w in weights:
            n, k = w.shape
            wg = w.float().reshape(n, k // g, g)
            lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q = torch.round((wg - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
            zero = lo + 8 * scale  # aten dequantizes (q - 8) * scale + zero
            sz = torch.stack([scale.reshape(n, -1).t(), zero.reshape(n, -1).t()], -1).to(torch.bfloat16)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.q.append((packed, sz.contiguous()))

    def nbytes(self):
        return _bytes(t for pair in self.q for t in pair)

    def run(self, xs):
        g = self.group_size
        for x, (p, sz) in zip(xs, self.q):
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, sz)


class IntMMDynamic(Kernel):
    """int8 activations quantized per row at run time, int8 weights, torch._int_mm."""

    name = "torch._int_mm dyn-int8 act"
    act_dtype = torch.float32

    def prepare(self, weights):
        self.q = []
        for w in weights:
            q, s = int8_per_channel(w.float())
            self.q.append((q.t().contiguous().t(), s))  # _int_mm wants K x N; keep as a transposed view

    def nbytes(self):
        return _bytes(t for pair in self.q for t in pair)

    def run(self, xs):
        for x, (q, s) in zip(xs, self.q):
            xs_ = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
            xq = torch.round(x / xs_).to(torch.int8)
            torch._int_mm(xq, q.t()).float() * xs_ * s


class FbgemmDynamic(Kernel):
    name = "fbgemm quantize_dynamic"
    act_dtype = torch.float32

    def prepare(self, weights):
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
        torch.backends.quantized.engine = "fbgemm"
        self.mods = []
        for w in weights:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.float()
            lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
            self.mods.append(DynLinear.from_float(lin))

    def nbytes(self):
        return sum(m.weight().numel() + 4 * m.weight().shape[0] for m in self.mods)

    def run(self, xs):
        for x, m in zip(xs, self.mods):
            m(x)


class NativeQuantized(Kernel):
    """elmd's own kernels behind elmd.engine.quantize.QuantizedLinear."""

    act_dtype = torch.bfloat16

    def __init__(self, quant: str):
        self.quant = quant
        self.name = f"elmd QuantizedLinear {quant}"

    def prepare(self, weights):
        from elmd.engine.quantize import QuantizedLinear, parse_quant

        spec = parse_quant(self.quant)
        self.mods = []
        for w in weights:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w
            self.mods.append(QuantizedLinear.from_float(lin, spec))
        self.kernel = self.mods[0].prepare()
        self.name += f" ({self.kernel})"

    def nbytes(self):
        return sum(_bytes(m.buffers()) for m in self.mods)

    def run(self, xs):
        for x, m in zip(xs, self.mods):
            m(x)


class NativeBF16(Kernel):
    """elmd.engine.quantize.BF16Linear: bf16 weights, bf16 or float32 activations."""

    def __init__(self, act_dtype):
        self.act_dtype = act_dtype
        self.name = f"elmd BF16Linear, {str(act_dtype).removeprefix('torch.')} act"

    def prepare(self, weights):
        from elmd.engine.quantize import BF16Linear

        self.mods = [BF16Linear.from_linear(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta"),
                                            weight=w.to(torch.bfloat16)) for w in weights]

    def nbytes(self):
        return sum(_bytes(m.parameters()) for m in self.mods)

    def run(self, xs):
        for x, m in zip(xs, self.mods):
            m(x)


def native_kernels() -> list[Kernel]:
    from elmd.engine.kernels import native

    if native.load() is None:
        return []
    return [NativeBF16(torch.bfloat16), NativeBF16(torch.float32), NativeQuantized("int8"), NativeQuantized("int4"), NativeQuantized("int4-g128")]


def all_kernels(names: list[str] | None) -> list[Kernel]:
    ks = [Dense(torch.bfloat16), Dense(torch.float32), Int8PackMM(), Int4PackMM(32), Int4PackMM(128),
          IntMMDynamic(), FbgemmDynamic(), *native_kernels()]
    return [k for k in ks if not names or any(n in k.name for n in names)]


def time_interleaved(kernels: list[Kernel], inputs: dict[str, list], repeats: int) -> dict[str, float]:
    """Median seconds per pass of each kernel, the kernels taking turns pass by pass so that
    a shared machine's changing load falls on all of them alike."""
    for k in kernels:
        k.run(inputs[k.name])  # warm up
    times = {k.name: [] for k in kernels}
    for _ in range(repeats):
        for k in kernels:
            t = time.perf_counter()
            k.run(inputs[k.name])
            times[k.name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="270M", choices=list(HUB_IDS))
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 512], help="rows per matmul (tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="timed passes per kernel (a third of it for M > 16)")
    p.add_argument("--no-head", action="store_true", help="leave out the tied output head")
    p.add_argument("--only", nargs="*", help="substrings of kernel names to run")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = layer_shapes(args.shape, not args.no_head)
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    kernels = all_kernels(args.only)
    for k in kernels:
        k.prepare(weights)
    del weights
    params = sum(n * k for n, k in shapes)
    print(f"{args.shape}: {len(shapes)} matmuls, {params / 1e6:.1f}M weights, {args.threads} threads")

    results = []
    bandwidths = []
    for m in args.m:
        inputs = {k.name: [torch.randn(m, kk, dtype=k.act_dtype) for _, kk in shapes] for k in kernels}
        bandwidths.append(read_bandwidth_gbs())
        seconds = time_interleaved(kernels, inputs, args.repeats if m <= 16 else max(3, args.repeats // 3))
        bandwidths.append(read_bandwidth_gbs())
        for k in kernels:
            t = seconds[k.name]
            results.append({"kernel": k.name, "m": m, "seconds": t, "bytes": k.nbytes(),
                            "gbs": k.nbytes() / t / 1e9, "tok_s": m / t})
    bw = statistics.median(bandwidths)
    print(f"read bandwidth (1 GiB float32 sum): median {bw:.1f} GB/s over {len(bandwidths)} runs "
          f"(min {min(bandwidths):.1f}, max {max(bandwidths):.1f})")
    print(f"{'kernel':40} {'M':>4} {'MB':>7} {'ms':>8} {'GB/s':>6} {'%bw':>5} {'tok/s':>8} {'ceiling':>8}")
    for r in results:
        print(f"{r['kernel']:40} {r['m']:>4} {r['bytes'] / 1e6:>7.0f} {r['seconds'] * 1e3:>8.2f} "
              f"{r['gbs']:>6.1f} {100 * r['gbs'] / bw:>5.0f} {r['tok_s']:>8.0f} "
              f"{bw * 1e9 / r['bytes'] * r['m']:>8.0f}")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "threads": args.threads,
                                         "read_bandwidth_gbs": bw, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
