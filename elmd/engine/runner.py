"""How a loaded OpenELM runs its cached forwards. openelm.py is the network in ATen ops;
the runner picks, per call, the fastest path that applies and holds what that path needs:

- the native plan (elmd/engine/kernels/decode.cpp): a whole decode step, or one sequence's
  prompt chunk, in one call into the CPU kernels (float32 models on x86);
- CUDA graphs (cuda_graphs.DecodeGraphs): decode steps replayed from captured graphs;
- else the network's own forward.

The scheduler calls the runner; tests and scoring call the network directly."""

from __future__ import annotations

import torch
from torch import nn

from elmd.engine.lora import Adapter, AdapterSet
from elmd.engine.openelm import OpenELM

NO_ADAPTERS = torch.empty(0, dtype=torch.long)  # a decode step's adapter ids when every row is the base's


class Runner:
    def __init__(self, model: OpenELM):
        self.model = model
        self.native_plan = None  # torch.classes.elmd.NativePlan when cached steps and prompts run natively
        self.head = model.head  # the output head; with the native plan, a float head on its float_linear
        self.decode_graphs = None  # elmd.engine.cuda_graphs.DecodeGraphs when decode steps replay CUDA graphs
        self.adapters = AdapterSet()  # LoRA adapters, applied per row (elmd/engine/lora.py)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 span: int | None = None, last_only: bool = False, adapters: list[int] | None = None) -> torch.Tensor:
        """Logits as OpenELM.forward gives them for a cached forward (`slots` given); `adapters`:
        the adapter index of each batch row (0 or None: the base)."""
        adapted = adapters is not None and any(adapters)
        if self.native_plan is not None:
            if tokens.shape[1] == 1:
                return self.decode_step(tokens[:, 0], positions[:, 0].contiguous(), slots, adapters)[:, None]
            if tokens.shape[0] == 1:
                return self.prefill_chunk(tokens[0], int(positions[0, 0]), int(slots[0]), last_only,
                                          adapters[0] if adapted else 0)[None]
        if self.decode_graphs is not None and tokens.shape[1] == 1 and not adapted:
            return self.decode_graphs(tokens, positions, slots)
        with self.adapters.rows(adapters if adapted else None):
            return self.model(tokens, positions, slots, span, last_only)

    def score(self, tokens: torch.Tensor, adapter: int = 0) -> torch.Tensor:
        """Logits of every position of `tokens` [1, T] without the cache (prompt log-probs)."""
        with self.adapters.rows([adapter] if adapter else None):
            return self.model(tokens, torch.arange(tokens.shape[1], device=tokens.device)[None])

    def add_adapter(self, adapter: Adapter) -> int:
        """Load `adapter` beside the base weights (no merge); its index for `__call__`."""
        index = self.adapters.add(adapter, self.model)
        self._attach_adapters()
        return index

    def adapter_bytes(self, index: int) -> int:
        """What adapter `index` holds: its tensors for the hooks (and scoring), and the native plan's
        copies (float16 over int8/int4 layers, B transposed)."""
        tensors = [t for d in self.adapters.prepared[index].values() for t in (d.a, d.b, d.factor) if t is not None]
        plan = self.native_plan.adapter_bytes(index) if self.native_plan is not None else 0
        return sum(t.numel() * t.element_size() for t in tensors) + plan

    def remove_adapter(self, name: str) -> int:
        index = self.adapters.remove(name)
        if self.native_plan is not None:
            self.native_plan.remove_adapter(index)
        return index

    def _attach_adapters(self) -> None:
        """Give the hooks and the native plan every loaded adapter (after a load, or after the
        kernels switch, which swaps layers and builds a new plan)."""
        if not self.adapters:
            return
        self.adapters.attach(self.model)
        if self.native_plan is not None:
            layers = len(self.model.transformer.layers)
            for index in self.adapters.prepared:
                self.native_plan.add_adapter(index, *self.adapters.plan_tensors(index, layers))

    def use_native_plan(self) -> bool:
        """Run cached forwards (decode steps, one sequence's prompt chunks) through the native
        plan where it applies: a float32 model on an x86 CPU that built the kernels, every
        linear layer on a kernel the plan runs."""
        from elmd.engine.kernels import native
        from elmd.engine.quantize import native_linear_args

        model = self.model
        norm = model.transformer.norm.weight
        if norm.device.type != "cpu" or norm.dtype != torch.float32 or native.ops() is None:
            return False
        layers = model.transformer.layers
        linears = [m for b in layers for m in (b.attn.qkv_proj, b.attn.out_proj, b.ffn.proj_1, b.ffn.proj_2)]
        args = [native_linear_args(m) for m in linears]
        if any(a is None for a in args):
            return False
        none = torch.empty(0)

        def layer_norms(block) -> list[torch.Tensor]:
            qk = (block.attn.q_norm.weight, block.attn.k_norm.weight) if block.attn.qk_norm else (none, none)
            return [block.attn_norm.weight, *qk, block.ffn_norm.weight]

        norms = [w for block in layers for w in layer_norms(block)] + [norm]
        self.native_plan = torch.classes.elmd.NativePlan(
            norms, [t for _, tensors, _ in args for t in tensors], [kind for kind, _, _ in args],
            [group for _, _, group in args], [b.attn.q_heads for b in layers], model.cfg.rms_norm_eps,
            model.cfg.ffn_with_glu, model.rope_cos, model.rope_sin)
        self.head = self._native_head()
        self._attach_adapters()
        return True

    def _native_head(self):
        """A float32 or bf16 output head (untied, or the tied embedding) on the native float_linear,
        so that its rows, like the layers', do not depend on the rows beside them; a quantized
        head already runs on the native kernels."""
        from elmd.engine.kernels import native
        from elmd.engine.quantize import BF16Linear

        model = self.model
        head = model._modules.get("lm_head")
        if head is None:
            weight = model.transformer.token_embeddings.weight
        elif type(head) in (nn.Linear, BF16Linear) and head.bias is None:
            weight = head.weight
        else:
            return model.head
        if weight.dtype not in (torch.float32, torch.bfloat16) or not native.supports_float(*weight.shape):
            return model.head
        return lambda h: torch.ops.elmd.float_linear(h, weight)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    adapters: list[int] | None = None) -> torch.Tensor:
        """Logits [B, vocab] for one new token per sequence, the layer stack run by the native
        plan in one call; float32 on the CPU."""
        x = self.model.transformer.token_embeddings(tokens)  # the residual stream, float32 [B, dim]
        ids = torch.tensor(adapters, dtype=torch.long) if adapters and any(adapters) else NO_ADAPTERS
        return self.head(self.native_plan.step(x, *self._cache_tensors(), slots, positions, ids))

    def prefill_chunk(self, tokens: torch.Tensor, start: int, slot: int, last_only: bool, adapter: int = 0) -> torch.Tensor:
        """Logits [T, vocab] (or [1, vocab] with `last_only`) for one sequence's T prompt tokens
        at positions start .. start + T - 1, cached in row `slot`, by the native plan."""
        x = self.model.transformer.token_embeddings(tokens)  # [T, dim]
        h = self.native_plan.prefill(x, *self._cache_tensors(), slot, start, adapter)
        return self.head(h[-1:] if last_only else h)

    def _cache_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's key and value caches, as the native plan takes them."""
        caches = [block.attn.cache for block in self.model.transformer.layers]
        return [c.k for c in caches], [c.v for c in caches]
