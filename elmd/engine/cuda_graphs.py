"""Decode steps replayed from CUDA graphs, one graph per batch size.

Why: at batch 1 a 270M decode step is a few hundred small kernels, and launching them from
Python costs more than running them (issue 9, on an H200: 93 tok/s eager, 488 replayed).
A captured step reads its inputs from static tensors and attends over the whole KV cache
(span = cache length, masked by position), so nothing in it depends on a value the host
would have to read back. The graphs point at the cache they were captured with: when the
scheduler resizes the cache they are captured again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from elmd.engine.openelm import OpenELM


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [B, 1], positions [B, 1], slots [B]: the inputs every replay reads
    positions: torch.Tensor
    slots: torch.Tensor
    logits: torch.Tensor  # [B, 1, vocab], written by every replay


class DecodeGraphs:
    def __init__(self, model: OpenELM, step: Callable | None = None):
        """`step` is what gets captured (default `model.layers_forward`; the GPU benchmark
        also captures a torch.compile'd one)."""
        self.model = model
        self.step = step or model.layers_forward
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every batch size
        self.graphs: dict[int, _Graph] = {}
        self.cache = None  # the KV cache the graphs were captured with

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, vocab] of one decode step, as `model.layers_forward` computes them."""
        cache = self.model.transformer.layers[0].attn.cache
        if cache is not self.cache:
            self.graphs.clear()
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
