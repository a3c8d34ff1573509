"""Decode steps as CUDA graphs: the captured step needs no value read back from the device
and computes what the ordinary step computes. The replay itself needs a CUDA device."""

from __future__ import annotations

import threading

import pytest
import torch

from elmd.engine.checkpoint import load_model
from elmd.engine.load import load_engine
from elmd.engine.openelm import OpenELM, OpenELMConfig
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
        logits = model.layers_forward(tokens, positions, slots, span=model.cache_length)
        assert logits.shape == (batch, 1, TINY["vocab_size"])
        with pytest.raises((RuntimeError, NotImplementedError)):  # the span read back from positions
            model.layers_forward(tokens, positions, slots)


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
        ordinary = model.layers_forward(tokens, positions, batch)
        captured_form = model.layers_forward(tokens, positions, batch, span=model.cache_length)
        one = model.layers_forward(tokens[1:2], positions[1:2], batch[1:2])
        one_captured_form = model.layers_forward(tokens[1:2], positions[1:2], batch[1:2], span=model.cache_length)
    assert torch.allclose(captured_form, ordinary, atol=1e-5)
    assert torch.allclose(one_captured_form, one, atol=1e-5)
    assert torch.allclose(one, ordinary[1:2], atol=1e-5)


@cuda
def test_graphed_decode_generates_what_eager_decode_generates(tiny):
    """Concurrent greedy requests (batch sizes 1 to 3, a prompt long enough to grow the KV
    cache, so graphs are captured again) give the same tokens with and without graphs."""
    prompts = [[1] + list(range(10, 10 + n)) for n in (4, 300, 33)]

    def generate(cuda_graphs: bool) -> list[list[int]]:
        e = load_engine(tiny, backend="torch", dtype="float32", device="cuda", slots=4, cuda_graphs=cuda_graphs)
        try:
            assert (e.backend.model.decode_graphs is not None) == cuda_graphs
            out: list[list[int]] = [[] for _ in prompts]

            def run(i):
                out[i] = e.generate(prompts[i], e.params(max_tokens=24, temperature=0, ignore_eos=True)).token_ids

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if cuda_graphs:
                assert e.backend.model.decode_graphs.graphs  # steps were replayed, not run eagerly
            return out
        finally:
            e.close()

    assert generate(cuda_graphs=True) == generate(cuda_graphs=False)
