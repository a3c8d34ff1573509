"""LoRA adapters against mlx-lm's own adapter code (#34), on both backends: adapters made and
applied as `mlx_lm.lora` does, PEFT's layout, batches per adapter, and what cannot be served.

Stated tolerance: prompt log-probs within 1e-4 (max abs) of mlx-lm's model under
`load_adapters` at float32 (and int8, over the same quantized base), on the tiny fixture;
greedy continuations identical; PEFT-layout adapters within 1e-4 between the two backends.
Measured (MLX 0.32 Linux CPU): PyTorch 1.4e-6, MLX 0 (mlx-lm's own layers, float32 and int8),
PEFT layout PyTorch vs MLX 1.4e-6.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402
from mlx_lm.utils import load_model as mlx_load_model  # noqa: E402
from mlx_lm.utils import save_config  # noqa: E402

from elmd.engine.lora import AdapterError  # noqa: E402
from elmd.engine.mlx_backend import MLXBackend, load_mlx_model  # noqa: E402
from elmd.engine.protocol import SamplingParams  # noqa: E402
from elmd.engine.torch_backend import TorchBackend  # noqa: E402
from elmd.fixtures import write_adapter, write_checkpoint  # noqa: E402

TOLERANCE = 1e-4
PROMPT = [int(t) for t in np.random.default_rng(5).integers(3, 1000, 20)]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
# mlx-lm's lora_parameters: all four linears of the last two blocks, or two of them on every block
SETUPS = {"lora": (2, ["attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"]),
          "dora": (3, ["attn.qkv_proj", "ffn.proj_2"])}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=1)


def mlx_lm_adapter(out: Path, base: Path, kind: str, seed: int) -> Path:
    """An adapter as `mlx_lm.lora` leaves one: its LoRA (DoRA) layers on the frozen model, the
    trainable parameters saved as its trainer saves them, and the config as it writes it; B and
    DoRA's m drawn as training would leave them (B starts at zero)."""
    num_layers, keys = SETUPS[kind]
    mx.random.seed(seed)
    model, _ = mlx_load_model(base)
    model.set_dtype(mx.float32)
    model.freeze()
    params = {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, num_layers, params, use_dora=kind == "dora")
    for _, module in model.named_modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
            if kind == "dora":
                module.m = module.m * (1 + 0.05 * mx.random.normal(module.m.shape))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config({"model": str(base), "fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": params,
                 "adapter_path": str(out), "seed": seed}, out / "adapter_config.json")
    return out


def mlx_lm_model(base: Path, adapter: Path | None, quant: str = "none"):
    """mlx-lm's model at float32 under `load_adapters` (its own LoRA code); `quant` as elmd quantizes the base."""
    if quant == "none":
        model, _ = mlx_load_model(base)
        model.set_dtype(mx.float32)
    else:
        model = load_mlx_model(base, "float32", quant)
    return load_adapters(model, str(adapter)) if adapter else model


def prompt_logprobs(model, ids: list[int]) -> np.ndarray:
    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(mx.take_along_axis(logprobs, mx.array(ids[1:])[:, None], axis=-1)[:, 0])


def scores(backend, adapter: str | None = None) -> np.ndarray:
    return np.array([lp.logprob for lp in backend.score(PROMPT, 0, adapter=adapter)])


def tokens(channel) -> list[int]:
    return [step.token_id for step in channel]


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlx-lm-adapters")
    return {kind: mlx_lm_adapter(root / kind, tiny, kind, seed) for seed, kind in enumerate(SETUPS)}


@pytest.fixture(scope="module")
def references(tiny, made) -> dict[str, np.ndarray]:
    return {kind: prompt_logprobs(mlx_lm_model(tiny, path), PROMPT) for kind, path in made.items()}


def serve(backend, made: dict[str, Path]):
    """(backend, the base's log-probs before any adapter, bytes each load reported)."""
    before = scores(backend)
    sizes = {kind: backend.load_adapter(kind, path) for kind, path in made.items()}
    return backend, before, sizes


@pytest.fixture(scope="module")
def torch_served(tiny, made):
    backend = TorchBackend(tiny, quant="none")
    yield serve(backend, made)
    backend.close()


@pytest.fixture(scope="module")
def mlx_served(tiny, made):
    backend = MLXBackend(tiny, dtype="float32")
    yield serve(backend, made)
    backend.close()


@pytest.mark.parametrize("kind", list(SETUPS))
@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_prompt_logprobs_match_mlx_lm(request, references, name, kind):
    """Log-probs with the adapter against mlx-lm's `load_adapters`; the base beside it unchanged."""
    backend, before, sizes = request.getfixturevalue(f"{name}_served")
    ours = scores(backend, kind)
    worst = float(np.abs(ours - references[kind]).max())
    print(f"{name}, {kind}: max-abs log-prob difference vs mlx-lm = {worst:.3g}")
    assert worst <= TOLERANCE
    assert float(np.abs(before - references[kind]).max()) > 100 * TOLERANCE  # the adapter counts
    assert np.array_equal(scores(backend), before)
    assert sizes[kind] > 0


def test_mlx_adapters_share_the_base_arrays(mlx_served):
    """An adapted model holds the base's arrays themselves, and mlx-lm's layers over them; the base has none."""
    backend, _, sizes = mlx_served
    base = dict(tree_flatten(backend.model.parameters()))
    for kind in SETUPS:
        adapted = backend._variants[backend._adapters[kind]].model
        own = {k: v for k, v in tree_flatten(adapted.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")}
        shared = {k.replace(".linear.", "."): v for k, v in tree_flatten(adapted.parameters()) if k not in own}
        assert shared.keys() == base.keys() and all(shared[k] is base[k] for k in base)
        assert sum(v.nbytes for v in own.values()) == sizes[kind]
    assert not any(isinstance(m, (LoRALinear, DoRALinear)) for _, m in backend.model.named_modules())


@pytest.mark.parametrize("kind", list(SETUPS))
def test_mlx_greedy_matches_mlx_lm(tiny, made, mlx_served, kind):
    """Greedy with the adapter, after the base ran the same prompt (its cached prefix must not be
    reused: another space), against mlx-lm's decoding with `load_adapters`."""
    backend, _, _ = mlx_served
    reference = mlx_lm_model(tiny, made[kind])
    expected = [tok for tok, _ in generate_step(mx.array(PROMPT), reference, max_tokens=GREEDY.max_tokens)]
    base = tokens(backend.submit(PROMPT, GREEDY, frozenset()))
    assert base != expected
    assert tokens(backend.submit(PROMPT, GREEDY, frozenset(), adapter=kind)) == expected
    assert tokens(backend.submit(PROMPT, GREEDY, frozenset(), adapter=kind)) == expected  # from its own cached prefix


def test_mlx_base_and_adapters_together_give_each_alone(mlx_served):
    backend, _, _ = mlx_served
    jobs = [(PROMPT, None), (PROMPT[:9], "lora"), (PROMPT, "dora"), (PROMPT[3:], "lora"), (PROMPT[5:], None)]
    alone = [tokens(backend.submit(p, GREEDY, frozenset(), adapter=a)) for p, a in jobs]
    channels = [backend.submit(p, GREEDY, frozenset(), adapter=a) for p, a in jobs]
    assert [tokens(c) for c in channels] == alone


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_layout_agrees_between_backends(tiny, tmp_path, torch_served, mlx_served, kind):
    folder = write_adapter(tmp_path / f"peft-{kind}", tiny, layout="peft", kind=kind, seed=7)
    results = []
    for backend, _, _ in (torch_served, mlx_served):
        backend.load_adapter(f"peft-{kind}", folder)
        results.append(scores(backend, f"peft-{kind}"))
        assert backend.unload_adapter(f"peft-{kind}")
    worst = float(np.abs(results[0] - results[1]).max())
    print(f"peft {kind}: max-abs log-prob difference torch vs mlx = {worst:.3g}")
    assert worst <= TOLERANCE


def test_mlx_quantized_base_matches_mlx_lm(tiny, made):
    """Over an int8 base (elmd's fp32-accumulating QuantizedLinear), mlx-lm's layers as its
    `load_adapters` puts them on the same quantized model."""
    backend = MLXBackend(tiny, dtype="float32", quant="int8")
    try:
        before = scores(backend)
        for kind, path in made.items():
            backend.load_adapter(kind, path)
            worst = float(np.abs(scores(backend, kind) - prompt_logprobs(mlx_lm_model(tiny, path, "int8"), PROMPT)).max())
            print(f"int8, {kind}: max-abs log-prob difference vs mlx-lm = {worst:.3g}")
            assert worst <= TOLERANCE
        assert np.array_equal(scores(backend), before)
        assert tokens(backend.submit(PROMPT, GREEDY, frozenset(), adapter="dora"))
    finally:
        backend.close()


def test_bad_adapters_are_refused_and_unload_frees_the_name(tiny, made, mlx_served, tmp_path):
    backend, before, _ = mlx_served
    lora = scores(backend, "lora")
    wide = write_checkpoint(tmp_path / "wide", "tiny", seed=1, config_overrides={"model_dim": 256})
    corrupt = shutil.copytree(made["lora"], tmp_path / "corrupt")
    (corrupt / "adapters.safetensors").write_bytes((corrupt / "adapters.safetensors").read_bytes()[:100])
    for folder, says in ((write_adapter(tmp_path / "wide-adapter", wide), "do not fit"), (corrupt, "cannot read")):
        with pytest.raises(AdapterError, match=says):
            backend.load_adapter("bad", folder)
    with pytest.raises(KeyError):
        backend.submit(PROMPT, GREEDY, frozenset(), adapter="bad")
    with pytest.raises(KeyError):
        backend.score(PROMPT, 0, adapter="bad")
    assert np.array_equal(scores(backend), before) and np.array_equal(scores(backend, "lora"), lora)

    space = backend._adapters["lora"]
    tokens(backend.submit(PROMPT, GREEDY, frozenset(), adapter="lora"))  # leaves a cached prefix in its space
    busy = backend.submit(PROMPT, SamplingParams(max_tokens=1000, temperature=0.0), frozenset(), adapter="lora")
    next(iter(busy))
    assert backend.cache_bytes().kv_cache > 0
    assert not backend.unload_adapter("lora")  # a request runs on it
    busy.cancel()
    tokens(busy)
    assert busy.finished.reason == "cancelled"
    assert any(key[0] == space for key in backend._prefix.entries)
    assert backend.unload_adapter("lora")
    assert not any(key[0] == space for key in backend._prefix.entries)
    with pytest.raises(KeyError):
        backend.score(PROMPT, 0, adapter="lora")
    backend.load_adapter("lora", made["lora"])
    assert backend._adapters["lora"] != space  # a new space: no prefix of the old one can be hit
    assert np.array_equal(scores(backend, "lora"), lora)
    assert tokens(backend.submit(PROMPT, GREEDY, frozenset(), adapter="lora"))
