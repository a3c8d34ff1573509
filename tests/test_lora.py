"""LoRA adapters on the PyTorch backend (#34): PEFT's own application as the reference, mixed
batches bitwise equal to each row alone, prefix caches per adapter, and what cannot be served.

Stated tolerance: log-probs (and cached-forward logits) within 1e-4 (max abs) of PEFT's model at
float32, on the tiny fixture. mlx-lm's adapters against mlx-lm's own code: tests/test_lora_mlx.py.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import closing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from elmd.engine.checkpoint import load_model
from elmd.engine.kernels import native
from elmd.engine.load import load_engine
from elmd.engine.lora import AdapterError, read_adapter
from elmd.engine.protocol import SamplingParams
from elmd.engine.torch_backend import TorchBackend
from elmd.fixtures import write_adapter, write_checkpoint
from test_batch_invariance import make_runner, paths

peft = pytest.importorskip("peft")

TOLERANCE = 1e-4
PROMPT = torch.randint(3, 1000, (1, 20), generator=torch.Generator().manual_seed(5))[0].tolist()
TARGETS = ["qkv_proj", "out_proj", "proj_1", "proj_2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=1)


def peft_model(base: Path, seed: int = 0, **options):
    """Our float32 OpenELM under PEFT's LoRA layers (PEFT's own code), B and DoRA's magnitude
    drawn nonzero as training would leave them."""
    model = peft.get_peft_model(load_model(base, dtype=torch.float32),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def peft_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.arange(len(tokens))[None])[0]


PEFT_VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


@pytest.fixture(scope="module", params=list(PEFT_VARIANTS))
def peft_adapter(request, tiny, tmp_path_factory):
    """(adapter folder saved by PEFT's save_pretrained, PEFT's logits over PROMPT)."""
    model = peft_model(tiny, **PEFT_VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(f"peft-{request.param}")
    model.save_pretrained(folder)
    return folder, peft_logits(model, PROMPT)


def test_prompt_logprobs_match_peft(tiny, peft_adapter):
    """The backend's scoring (the network's forward, hooks on its layers) with the adapter, against
    PEFT's model; the base served beside it keeps its own log-probs."""
    folder, reference = peft_adapter
    backend = TorchBackend(tiny, quant="none", prefix_cache_bytes=0)
    try:
        base_before = [lp.logprob for lp in backend.score(PROMPT, 0)]
        assert backend.load_adapter("mine", folder) > 0
        ours = torch.tensor([lp.logprob for lp in backend.score(PROMPT, 0, adapter="mine")])
        expected = torch.log_softmax(reference[:-1], dim=-1)[torch.arange(len(PROMPT) - 1), PROMPT[1:]]
        worst = float((ours - expected).abs().max())
        print(f"{folder.name}: max-abs log-prob difference vs PEFT = {worst:.3g}")
        assert worst <= TOLERANCE
        assert [lp.logprob for lp in backend.score(PROMPT, 0)] == base_before
    finally:
        backend.close()


@pytest.mark.parametrize("path", paths())
def test_cached_forwards_match_peft(tiny, peft_adapter, path):
    """The serving path (prompt chunks and decode steps through the runner: the native plan's
    float_linear deltas, or the hooks on ATen) against PEFT's full forward at every position."""
    folder, reference = peft_adapter
    runner = make_runner(tiny, "none", path)
    index = runner.add_adapter(read_adapter(folder, runner.model.cfg))
    with torch.inference_mode():
        prompt = runner(torch.tensor([PROMPT[:12]]), torch.arange(12)[None], torch.tensor([0]), adapters=[index])[0]
        steps = [runner(torch.tensor([[t]]), torch.tensor([[12 + i]]), torch.tensor([0]), adapters=[index])[0, -1]
                 for i, t in enumerate(PROMPT[12:])]
    ours = torch.cat([prompt, torch.stack(steps)])
    worst = float((ours - reference).abs().max())
    print(f"{folder.name}, {path}: max-abs logit difference vs PEFT = {worst:.3g}")
    assert worst <= TOLERANCE


@pytest.fixture(scope="module")
def two_adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return write_adapter(root / "mlx-lora", tiny, "mlx", seed=3), write_adapter(root / "peft-dora", tiny, "peft", seed=4, kind="dora")


@pytest.mark.skipif(native.load() is None, reason="needs the native kernels")
@pytest.mark.parametrize("quant", ["none", "bf16", "int8", "int4"])
def test_a_mixed_batch_gives_each_row_its_logits_alone(tiny, two_adapters, quant):
    """Eight sequences over two adapters and the base, at other positions, decode one token
    together: each row equals its step alone (torch.equal), and the adapter's prompt gives the
    same logits however it is split into chunks."""
    runner = make_runner(tiny, quant, "native")
    indexes = [0] + [runner.add_adapter(read_adapter(a, runner.model.cfg)) for a in two_adapters]
    gen = torch.Generator().manual_seed(11)
    lengths = [3, 40, 17, 1, 24, 9, 31, 16]
    adapters = [indexes[i % 3] for i in range(8)]
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lengths]
    nexts = torch.randint(3, 1000, (8,), generator=gen).tolist()
    with torch.inference_mode():
        for slot, (prompt, adapter) in enumerate(zip(prompts, adapters)):
            runner(torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([slot]), adapters=[adapter])
        batch = runner(torch.tensor(nexts)[:, None], torch.tensor(lengths)[:, None], torch.arange(8),
                       span=max(lengths) + 1, adapters=adapters)[:, -1]
        for i, n in enumerate(lengths):
            alone = runner(torch.tensor([[nexts[i]]]), torch.tensor([[n]]), torch.tensor([i]), span=n + 1,
                           adapters=[adapters[i]])[0, -1]
            assert torch.equal(batch[i], alone), i
        assert not torch.equal(batch[1], runner(torch.tensor([[nexts[1]]]), torch.tensor([[lengths[1]]]),
                                                torch.tensor([1]), span=lengths[1] + 1)[0, -1])  # the adapter counts
        whole = runner(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], torch.tensor([8]), adapters=[indexes[2]])[0]
        for cut in (1, 7, 13):
            parts = [runner(torch.tensor([PROMPT[a:b]]), torch.arange(a, b)[None], torch.tensor([8]), span=b,
                            adapters=[indexes[2]])[0] for a, b in ((0, cut), (cut, len(PROMPT)))]
            assert torch.equal(torch.cat(parts), whole), cut


def greedy(backend: TorchBackend, prompt: list[int], adapter: str | None, **params):
    params = SamplingParams(max_tokens=16, temperature=params.pop("temperature", 0), ignore_eos=True, logprobs=3, **params)
    return backend.submit(prompt, params, frozenset(), adapter=adapter)


def steps(channel) -> list[tuple]:
    return [(s.token_id, s.logprob.logprob) for s in channel]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_replies_mixed_cached_and_speculated_equal_each_alone(tiny, two_adapters, quant):
    """Through the scheduler: the base and two adapters, greedy and seeded, each alone, then all at
    once with speculation on (prompt lookup guesses in a looping prompt), then again from the prefix
    cache: the same tokens and log-probs. The adapter's prompt does not reuse the base's cached
    prefix (its keys and values differ), only its own."""
    looping = [5, 6, 7, 8, 9, 10] * 4
    names = [None, "lora", "dora"]
    with closing(TorchBackend(tiny, quant=quant, slots=4, speculation=False)) as plain:
        for name, folder in zip(names[1:], two_adapters):
            plain.load_adapter(name, folder)
        alone = {(n, seed): steps(greedy(plain, looping, n, **({"temperature": 0.8, "seed": seed} if seed else {})))
                 for n in names for seed in (None, 7)}
        assert len({tuple(v) for v in alone.values()}) == len(alone)  # every adapter (and seed) answers its own way
        cached = plain.submit(looping, SamplingParams(max_tokens=1), frozenset(), adapter="lora")
        list(cached)
        assert cached.cached_tokens > 0  # its own prefix, kept when its first request finished
        plain.unload_adapter("lora")
        plain.load_adapter("lora", two_adapters[0])  # a new index: the old entries cannot be hit
        fresh = plain.submit(looping, SamplingParams(max_tokens=1), frozenset(), adapter="lora")
        list(fresh)
        assert fresh.cached_tokens == 0
    with closing(TorchBackend(tiny, quant=quant, slots=6, speculation=True)) as speculating:
        for name, folder in zip(names[1:], two_adapters):
            speculating.load_adapter(name, folder)
        channels = {(n, seed): greedy(speculating, looping, n, **({"temperature": 0.8, "seed": seed} if seed else {}))
                    for n in names for seed in (None, 7)}
        assert {key: steps(c) for key, c in channels.items()} == alone
        assert speculating.scheduler.accepted_tokens > 0


def test_unloading_waits_for_the_sequences_that_use_it(tiny, two_adapters):
    with closing(TorchBackend(tiny, quant="int8", slots=2)) as backend:
        nbytes = backend.load_adapter("lora", two_adapters[0])
        float32 = read_adapter(two_adapters[0], backend.model.cfg).nbytes
        # its float32 tensors, and on the native plan their float16 copies over the int8 layers
        assert nbytes == (float32 * 3 // 2 if backend.runner.native_plan is not None else float32)
        running = backend.submit(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True), frozenset(), adapter="lora")
        next(iter(running))
        assert backend.unload_adapter("lora") is False
        running.cancel()
        list(running)
        assert backend.unload_adapter("lora") is True
        with pytest.raises(KeyError):
            backend.submit(PROMPT, SamplingParams(max_tokens=2), frozenset(), adapter="lora")
        # a sequence whose adapter went between its lookup and its admission ends alone, with an error
        beside = backend.submit(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), frozenset())
        orphan = backend.scheduler.submit(PROMPT, SamplingParams(max_tokens=4), frozenset(), adapter=1)
        assert list(orphan) == [] and orphan.finished.reason == "error" and "unloaded" in orphan.finished.error
        assert len(list(beside)) == 4 and beside.finished.reason == "length"


# -- what cannot be served: a clear error naming the file and the key ---------------------------


def broken(folder: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / f"broken-{folder.name}"
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def edit_config(**changes):
    def edit(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def edit_tensors(change):
    def edit(folder: Path) -> None:
        file = next(folder.glob("*.safetensors"))
        tensors = load_file(str(file))
        change(tensors)
        save_file(tensors, str(file))
    return edit


def drop_b(tensors):
    del tensors[next(k for k in tensors if k.endswith(("lora_b", "lora_B.weight")))]


def add_head(tensors):
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)


def corrupt(folder: Path) -> None:
    file = next(folder.glob("*.safetensors"))
    file.write_bytes(file.read_bytes()[:100])


REFUSED = {  # case -> (layout, edit, words the message must hold)
    "full fine-tune": ("mlx", edit_config(fine_tune_type="full"), ["adapter_config.json", "fine_tune_type"]),
    "embedding keys": ("mlx", edit_config(lora_parameters={"rank": 8, "scale": 2.0, "keys": ["token_embeddings"]}),
                       ["adapter_config.json", "token_embeddings"]),
    "modules_to_save": ("peft", edit_config(modules_to_save=["lm_head"]), ["adapter_config.json", "modules_to_save"]),
    "rank_pattern": ("peft", edit_config(rank_pattern={"qkv_proj": 4}), ["adapter_config.json", "rank_pattern"]),
    "lm_head tensor": ("peft", edit_tensors(add_head), ["adapter_model.safetensors", "lm_head"]),
    "missing B": ("mlx", edit_tensors(drop_b), ["adapters.safetensors", "lora_b"]),
    "corrupt file": ("peft", corrupt, ["adapter_model.safetensors", "cannot read"]),
    "bad json": ("mlx", lambda f: (f / "adapter_config.json").write_text("{"), ["adapter_config.json", "JSON"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_be_served_is_refused_by_file_and_key(tiny, tmp_path, case):
    layout, edit, words = REFUSED[case]
    folder = broken(write_adapter(tmp_path / layout, tiny, layout), tmp_path, edit)
    with pytest.raises(AdapterError) as error:
        read_adapter(folder, load_model(tiny).cfg)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_an_adapter_for_another_model_is_refused_by_its_shapes(tiny, tmp_path):
    other = write_checkpoint(tmp_path / "wider", "tiny", seed=1, config_overrides={"model_dim": 192})
    deeper = write_checkpoint(tmp_path / "deeper", "tiny", seed=1,
                              config_overrides={"num_transformer_layers": 6, "ffn_multipliers": [1.0] * 6,
                                                "num_query_heads": [4] * 6, "num_kv_heads": [2] * 6})
    cfg = load_model(tiny).cfg
    with pytest.raises(AdapterError, match=r"adapters\.safetensors: transformer\.layers\.0\.attn\.\w+: .*do not fit"):
        read_adapter(write_adapter(tmp_path / "a", other, "mlx"), cfg)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: transformer\.layers\.\d\.\S+: the base has \d layers"):
        read_adapter(write_adapter(tmp_path / "b", deeper, "peft", layers=3), cfg)  # its last 3 of 6


# -- quantized bases: a perplexity gate like the quantization gates ------------------------------


@pytest.mark.slow
def test_a_trained_adapter_keeps_its_gain_on_int8_and_int4_bases(tmp_path_factory):
    """A LoRA trained with PEFT on real weights (SmolLM2-135M, the offline model) to continue one
    paragraph: served on float32, int8 and int4 bases, it keeps most of what it learned.

    Bounds (measured: see the printed line): training lowers the float perplexity at least 2x;
    the adapted int8 model is within 3% of the adapted float one, int4 within 15% (the bases
    alone differ about as much: the quantization gates of tests/test_offline_model.py)."""
    from offline_checkpoint import converted

    base = converted(tmp_path_factory, dtype="float32")
    text = (Path(__file__).parent / "data" / "english_paragraph.txt").read_text().strip()
    folder = tmp_path_factory.mktemp("trained")
    train_lora(base, text, folder)
    perplexities = {}
    for quant in ("none", "int8", "int4"):
        with closing(load_engine(base, backend="torch", quant=quant)) as engine:
            ids = engine.tokenizer.encode(text)
            perplexities[quant, None] = perplexity(engine.backend.score(ids, 0))
            engine.backend.load_adapter("trained", folder)
            perplexities[quant, "trained"] = perplexity(engine.backend.score(ids, 0, adapter="trained"))
    print({f"{q}{'+lora' if a else ''}": round(p, 2) for (q, a), p in perplexities.items()})
    assert perplexities["none", "trained"] * 2 <= perplexities["none", None]
    assert perplexities["int8", "trained"] <= 1.03 * perplexities["none", "trained"]
    assert perplexities["int4", "trained"] <= 1.15 * perplexities["none", "trained"]


def perplexity(logprobs) -> float:
    return math.exp(-sum(lp.logprob for lp in logprobs) / len(logprobs))


def train_lora(base: Path, text: str, out: Path, steps: int = 6) -> None:
    """PEFT's LoRA (r 8 on every linear layer) trained with Adam to continue `text`; saved by PEFT."""
    from elmd.engine.tokenizer import Tokenizer

    torch.manual_seed(0)
    ids = torch.tensor([Tokenizer.from_dir(base).encode(text)])
    model = peft.get_peft_model(load_model(base, dtype=torch.float32), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    positions = torch.arange(ids.shape[1])[None]
    for _ in range(steps):
        logits = model(ids, positions)[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)


def test_an_adapter_whose_files_change_is_read_again(tiny, tmp_path):
    """`elmd import --force` replaces an adapter's files in place: the next request reads them."""
    folder = write_adapter(tmp_path / "lora", tiny, "mlx", seed=3)
    with closing(load_engine(tiny, backend="torch", quant="int8")) as engine:
        first = engine.with_adapter("lora", folder).complete("hello", max_tokens=8, temperature=0, ignore_eos=True)
        fingerprint = engine.with_adapter("lora", folder).system_fingerprint
        write_adapter(folder, tiny, "mlx", seed=5)
        again = engine.with_adapter("lora", folder)
        assert again.complete("hello", max_tokens=8, temperature=0, ignore_eos=True) != first
        assert again.system_fingerprint != fingerprint != engine.system_fingerprint
        assert list(engine.adapters) == ["lora"]
