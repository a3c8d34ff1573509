"""Decode steps replayed from CUDA graphs, one graph per batch size, optionally of a
torch.compile'd step.

Why: at batch 1 a 270M decode step is a few hundred small kernels, and launching them from
Python costs more than running them. On an H100 (benchmarks/gpu.py, 270M bf16, batch 1):
137 tok/s eager, 621 replayed, 1,305 replayed from a torch.compile'd step, and 1,539 from
`compiled_step` (reductions, tuned), against a copy-bandwidth limit of 5,550. A captured
step reads its inputs from static tensors and attends over the whole KV cache (span = cache
length, masked by position), so nothing in it depends on a value the host would have to
read back. The graphs point at the cache they were captured with: when the scheduler
resizes the cache they are captured again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from elmd.engine.openelm import OpenELM, decode_attention


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [B, 1], positions [B, 1], slots [B]: the inputs every replay reads
    positions: torch.Tensor
    slots: torch.Tensor
    logits: torch.Tensor  # [B, 1, vocab], written by every replay


class DecodeGraphs:
    def __init__(self, model: OpenELM, step: Callable | None = None):
        """`step` is what gets captured (default `model.forward`; see `compiled_step`)."""
        self.model = model
        self.step = step or model.forward
        self.pool = None  # one memory pool shared by the graphs of every batch size
        self.graphs: dict[int, _Graph] = {}
        self.cache = None  # the KV cache the graphs were captured with

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, vocab] of one decode step, as `model.forward` computes them."""
        cache = self.model.transformer.layers[0].attn.cache
        if cache is not self.cache:
            # A pool whose graphs are all freed cannot be captured into again (PyTorch asserts
            # use_count > 0), so new graphs take a new pool.
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()
            self.cache = cache
        graph = self.graphs.get(tokens.shape[0])
        if graph is None:
            graph = self.graphs[tokens.shape[0]] = self._capture(tokens, positions, slots)
        else:
            graph.tokens.copy_(tokens)
            graph.positions.copy_(positions)
            graph.slots.copy_(slots)
            graph.graph.replay()
        return graph.logits.clone()  # the next replay overwrites the static output

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> _Graph:
        """Capture a step of this batch size on this step's real inputs. The warm-up run and the
        replay that follows the capture both write the same keys and values at the same cache
        positions, so the running sequences' caches stay as they were."""
        tokens, positions, slots = tokens.clone(), positions.clone(), slots.clone()
        span = self.model.cache_length

        def step() -> torch.Tensor:
            return self.step(tokens, positions, slots, span=span)

        side = torch.cuda.Stream()  # warm up off the capturing stream, as torch.cuda.graphs asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # the first run allocates cuBLAS workspace and compiles what is compiled
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        graph.replay()
        return _Graph(graph, tokens, positions, slots, logits)


def compiled_step(model: OpenELM, reductions: bool = True, tune: bool = True) -> Callable:
    """`model.forward` under torch.compile(fullgraph), for DecodeGraphs to capture.

    With `reductions`, the decode step's matrix-vector products and attention are written as
    broadcast products and sums while compiling: Inductor makes each one Triton reduction and
    reads the KV cache rows in place, where the ATen forms call a cuBLAS GEMV (~4.8 us at any
    of the 270M's sizes on an H100) and copy the rows out for a batched matmul. `tune`:
    Inductor's coordinate-descent tuning of those kernels' block sizes (as gpt-fast)."""
    if reductions:
        for module in model.modules():
            if type(module) is nn.Linear and module.bias is None:
                module.forward = functools.partial(_linear, module)
        for block in model.transformer.layers:
            block.attn.decode_attention = _decode_attention
    return torch.compile(model.forward, fullgraph=True, options={"coordinate_descent_tuning": tune})


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., 1, K] @ weight[N, K].T as a broadcast product and sum over K."""
    return (x.unsqueeze(-2) * weight).sum(-1)


def _linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The linear's forward: a reduction for one-token steps being compiled, else F.linear
    (eagerly the broadcast product would be materialized)."""
    if torch.compiler.is_compiling() and x.shape[-2] == 1:
        return matvec(x, linear.weight)
    return F.linear(x, linear.weight)


def _decode_attention(q, k, v, mask):
    """The attention's decode form: reductions while compiling, else the ATen one."""
    if torch.compiler.is_compiling():
        return reduction_attention(q, k, v, mask)
    return decode_attention(q, k, v, mask)


def reduction_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """openelm.decode_attention as products and sums, with the query heads grouped under their
    kv head: compiled, the gather of the cache rows fuses into the score and output reductions."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    q = q.view(B, kv_heads, H // kv_heads, 1, D)
    scores = (q * k[:, :, None]).sum(-1) * D**-0.5  # [B, kv, group, S]
    if mask is not None:  # [B, 1, 1, S]
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).type_as(v)
    return (p[..., None] * v[:, :, None]).sum(-2).view(B, H, 1, D)
