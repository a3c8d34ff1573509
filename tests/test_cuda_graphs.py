"""Decode steps as CUDA graphs: the captured step needs no value read back from the device
and computes what the ordinary step computes. The replay itself needs a CUDA device."""

from __future__ import annotations

import threading

import pytest
import torch

from elmd.engine.checkpoint import load_model
from elmd.engine.cuda_graphs import compiled_step, matvec, reduction_attention
from elmd.engine.load import load_engine
from elmd.engine.openelm import OpenELM, OpenELMConfig, decode_attention
from elmd.fixtures import TINY, write_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=3)


def _meta_model(slots: int, length: int) -> OpenELM:
    with torch.device("meta"):
        model = OpenELM(OpenELMConfig.from_dict(TINY))
    model.to("meta")  # the RoPE tables are built on the CPU
    model.setup_caches(slots, length)
    return model


@pytest.mark.parametrize("batch", [1, 3])
def test_the_captured_decode_step_reads_nothing_back_from_the_device(batch):
    """On the meta device a tensor has no values, so any read-back (`int(t)`, `.item()`, a
    data-dependent shape) raises: what runs here also runs inside a CUDA graph capture."""
    model = _meta_model(slots=4, length=64)
    meta = dict(dtype=torch.long, device="meta")
    tokens, positions, slots = torch.empty(batch, 1, **meta), torch.empty(batch, 1, **meta), torch.empty(batch, **meta)
    with torch.inference_mode():
        logits = model.forward(tokens, positions, slots, span=model.cache_length)
        assert logits.shape == (batch, 1, TINY["vocab_size"])
        with pytest.raises((RuntimeError, NotImplementedError)):  # the span read back from positions
            model.forward(tokens, positions, slots)


def test_decode_over_the_whole_cache_matches_the_ordinary_step(tiny):
    """Three sequences at positions 5, 40 and 17: attending over every cached position with a
    position mask (the captured form) gives the logits of attending up to each position."""
    model = load_model(tiny)
    model.setup_caches(4, 64)
    lengths, slots = [5, 40, 17], [2, 0, 3]
    torch.manual_seed(0)
    with torch.inference_mode():
        for slot, n in zip(slots, lengths):
            ids = torch.randint(3, model.cfg.vocab_size, (1, n))
            model(ids, torch.arange(n)[None], torch.tensor([slot]))
        tokens = torch.tensor([[7], [8], [9]])
        positions = torch.tensor(lengths)[:, None]
        batch = torch.tensor(slots)
        ordinary = model.forward(tokens, positions, batch)
        captured_form = model.forward(tokens, positions, batch, span=model.cache_length)
        one = model.forward(tokens[1:2], positions[1:2], batch[1:2])
        one_captured_form = model.forward(tokens[1:2], positions[1:2], batch[1:2], span=model.cache_length)
    assert torch.allclose(captured_form, ordinary, atol=1e-5)
    assert torch.allclose(one_captured_form, one, atol=1e-5)
    assert torch.allclose(one, ordinary[1:2], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_reduction_forms_compute_the_aten_forms(batch):
    """The compiled CUDA step's matrix-vector product and grouped-query attention (5 query
    heads per kv head, a position mask) agree with F.linear and decode_attention."""
    torch.manual_seed(batch)
    x, w = torch.randn(batch, 1, 96), torch.randn(200, 96)
    assert torch.allclose(matvec(x, w), torch.nn.functional.linear(x, w), atol=1e-4)
    q, k, v = torch.randn(batch, 10, 1, 32), torch.randn(batch, 2, 40, 32), torch.randn(batch, 2, 40, 32)
    mask = torch.arange(40)[None, None, None, :] <= torch.tensor([5, 39, 17][:batch])[:, None, None, None]
    assert torch.allclose(reduction_attention(q, k, v, mask), decode_attention(q, k, v, mask), atol=1e-5)


def test_the_compiled_step_computes_the_eager_step(tiny):
    """compiled_step's reductions are what torch.compile traces (here Inductor's CPU code, on
    a CUDA GPU Triton's); eagerly the same modules still run the ATen forms."""
    model = load_model(tiny)
    model.setup_caches(4, 64)
    with torch.inference_mode():
        for slot, n in zip([0, 2], [9, 30]):
            model(torch.arange(3, 3 + n)[None], torch.arange(n)[None], torch.tensor([slot]))
        tokens, positions, slots = torch.tensor([[7], [8]]), torch.tensor([[9], [30]]), torch.tensor([0, 2])
        eager = model.forward(tokens, positions, slots, span=64)
        step = compiled_step(model, tune=False)
        assert torch.allclose(model.forward(tokens, positions, slots, span=64), eager)
        compiled = step(tokens, positions, slots, span=64)
    assert torch.allclose(compiled, eager, atol=1e-4)


@cuda
def test_graphed_decode_generates_what_eager_decode_generates(tiny):
    """Concurrent greedy requests (batch sizes 1 to 3, a prompt long enough to grow the KV
    cache, so graphs are captured again) give the same tokens with and without graphs."""
    prompts = [[1] + list(range(10, 10 + n)) for n in (4, 300, 33)]

    def generate(cuda_graphs: bool) -> list[list[int]]:
        e = load_engine(tiny, backend="torch", dtype="float32", device="cuda", slots=4, cuda_graphs=cuda_graphs)
        try:
            assert (e.backend.runner.decode_graphs is not None) == cuda_graphs
            out: list[list[int]] = [[] for _ in prompts]

            def run(i):
                out[i] = e.generate(prompts[i], e.params(max_tokens=24, temperature=0, ignore_eos=True)).token_ids

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if cuda_graphs:
                assert e.backend.runner.decode_graphs.graphs  # steps were replayed, not run eagerly
            return out
        finally:
            e.close()

    assert generate(cuda_graphs=True) == generate(cuda_graphs=False)
