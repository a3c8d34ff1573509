"""The PyTorch OpenELM agrees with an independent implementation: mlx-lm's `openelm` model.

Same weights (a generated checkpoint in the hub's layout), fp32 on both sides. Stated
tolerance: max-abs logit difference <= 1e-4 over the prompt and over 32 cached decode
steps (decoded by ATen ops and by the fused native ops); greedy continuations identical
for 64 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.utils import load_model as mlx_load_model  # noqa: E402

from elmd.engine.checkpoint import load_model  # noqa: E402
from elmd.engine.protocol import SamplingParams  # noqa: E402
from elmd.engine.kernels import native  # noqa: E402
from elmd.engine.runner import Runner  # noqa: E402
from elmd.engine.torch_backend import TorchBackend  # noqa: E402
from elmd.fixtures import write_checkpoint  # noqa: E402

TOLERANCE = 1e-4
PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]


@pytest.fixture(scope="module", params=["tiny", "270M"])
def checkpoint(request, tmp_path_factory):
    return request.param, write_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=7)


def _prompt(shape: str) -> list[int]:
    return [t % 1024 for t in PROMPT] if shape == "tiny" else PROMPT


def _mlx_logits(model, ids, cache=None) -> np.ndarray:
    out = model(mx.array([ids]), cache=cache).astype(mx.float32)
    return np.array(out)[0]


DECODE_PATHS = ["aten"] + (["native"] if native.load() is not None else [])


@pytest.mark.parametrize("decode", DECODE_PATHS)
def test_logits_over_prompt_and_cached_decode_agree(checkpoint, decode):
    shape, path = checkpoint
    ids = _prompt(shape)
    model = load_model(path, dtype=torch.float32)
    ours = Runner(model)
    if decode == "native":
        assert ours.use_native_plan()
    ref, _ = mlx_load_model(path)
    ref.set_dtype(mx.float32)

    model.setup_caches(1, 256)
    slot = torch.tensor([0])
    with torch.inference_mode():
        a = ours(torch.tensor([ids]), torch.arange(len(ids))[None], slot).numpy()[0]
    cache = make_prompt_cache(ref)
    b = _mlx_logits(ref, ids, cache)
    worst = float(np.abs(a - b).max())

    token = int(a[-1].argmax())
    for step in range(32):
        pos = len(ids) + step
        with torch.inference_mode():
            a = ours(torch.tensor([[token]]), torch.tensor([[pos]]), slot).numpy()[0, -1]
        b = _mlx_logits(ref, [token], cache)[-1]
        worst = max(worst, float(np.abs(a - b).max()))
        token = int(a.argmax())
    print(f"{shape}, {decode} decode: max-abs logit difference over prompt + 32 decode steps = {worst:.3g}")
    assert worst <= TOLERANCE


def test_greedy_continuations_identical_for_64_tokens(checkpoint):
    shape, path = checkpoint
    ids = _prompt(shape)
    backend = TorchBackend(path, dtype="float32", slots=2)
    try:
        channel = backend.submit(ids, SamplingParams(max_tokens=64, temperature=0.0), frozenset())
        ours = [step.token_id for step in channel]
    finally:
        backend.close()
    ref, _ = mlx_load_model(path)
    ref.set_dtype(mx.float32)
    theirs = [tok for tok, _ in generate_step(mx.array(ids), ref, max_tokens=64)]
    assert len(ours) == 64
    assert ours == theirs
