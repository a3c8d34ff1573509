"""Same request, same answer (#30): a sequence's logits at a position are bitwise the same
whatever batch it shares, however its prompt was split into chunks, however much of it came
from the prefix cache, with or without speculation.

Checked with torch.equal on the tiny fixture, at float32, bf16, int8 and int4, on the native plan
(the path users get where the kernels build) and on ATen's ops; the other native build
(avx2 beside avx512) and ELMD_CPU_KERNELS=aten run this file again in a child process, as
tests/test_cpu_kernels.py does (one native build per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import torch

from elmd.engine.checkpoint import load_model
from elmd.engine.kernels import native
from elmd.engine.load import load_engine
from elmd.engine.protocol import SamplingParams
from elmd.engine import quantize
from elmd.engine.quantize import QuantizedLinear, quantize_model
from elmd.engine.runner import Runner
from elmd.fixtures import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
QUANTS = ["none", "bf16", "int8", "int4"]
PROMPT = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(7))[0].tolist()
IN_CHILD = "ELMD_INVARIANCE_CHILD"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=1)


ATTENTION = "ATen's attention: SDPA for prompt chunks, a batched matmul for decode steps (MKL orders a row's sums by the call's rows, batch and strides)"
NOT_YET = {  # (path, quant) -> why its logits still depend on the batch
    ("aten", "none"): f"{ATTENTION}; MKL's sgemm too (another order at 1-3 and 5 rows)",
    ("aten", "bf16"): f"{ATTENTION}; oneDNN's bf16 matmul too (another order at 1 row)",
    ("aten", "int8"): f"{ATTENTION}; the int8 kernel itself is invariant, and its bf16 input hides most of it",
    ("aten", "int4"): f"{ATTENTION}; the int4 kernel itself is invariant, and its bf16 input hides most of it",
}


def paths() -> list[str]:
    """The runner paths this process can run: the native plan where a build loaded, ATen's ops always."""
    return (["native"] if native.load() is not None else []) + ["aten"]


def cases() -> list:
    """(path, quant) pairs, the ones not yet invariant marked as expected failures."""
    return [pytest.param(path, quant, marks=pytest.mark.xfail(reason=NOT_YET[path, quant], strict=False))
            if (path, quant) in NOT_YET else (path, quant) for path in paths() for quant in QUANTS]


def engine_quants() -> list:
    """The quants of the engine tests, on the path this process runs."""
    path = paths()[0]
    return [pytest.param(quant, marks=pytest.mark.xfail(reason=NOT_YET[path, quant], strict=False))
            if (path, quant) in NOT_YET else quant for quant in QUANTS]


def make_runner(checkpoint, quant: str, path: str, slots: int = 9, length: int = 64) -> Runner:
    """The model at `quant` behind a runner on `path`: "native" (the plan, as the torch
    backend runs it) or "aten" (the network's own forward on ATen's kernels)."""
    model = quantize_model(load_model(checkpoint), quant, embedding=quant != "none")
    runner = Runner(model)
    if path == "native":
        assert runner.use_native_plan()
    else:
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.prepare("aten")
    model.setup_caches(slots, length)
    return runner


def chunked(runner: Runner, tokens: list[int], cuts: list[int], slot: int = 0, start: int = 0) -> torch.Tensor:
    """Logits [len(tokens), vocab] of `tokens` at positions start.., prefilled in chunks that end at `cuts`."""
    out, a = [], 0
    with torch.inference_mode():
        for b in [*cuts, len(tokens)]:
            if b > a:
                t = torch.tensor([tokens[a:b]])
                out.append(runner(t, torch.arange(start + a, start + b)[None], torch.tensor([slot]), span=start + b)[0])
            a = b
    return torch.cat(out)


@pytest.mark.parametrize("path, quant", cases())
def test_a_prompt_gives_the_same_logits_however_it_is_split(tiny, path, quant):
    """One chunk, two chunks split at every boundary, and token by token (decode steps, as a
    prompt lookup's or a draft's verified guess would be): every position's logits equal."""
    runner = make_runner(tiny, quant, path)
    whole = chunked(runner, PROMPT, [])
    for cut in range(1, len(PROMPT)):
        assert torch.equal(chunked(runner, PROMPT, [cut]), whole), cut
    assert torch.equal(chunked(runner, PROMPT, list(range(1, len(PROMPT)))), whole)
    assert torch.equal(chunked(runner, PROMPT, [5, 6, 13, 21]), whole)
    with torch.inference_mode():  # the scheduler's prompt chunk: the head on its last position only
        last = runner(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], torch.tensor([0]), span=len(PROMPT),
                      last_only=True)
    assert torch.equal(last[0, -1], whole[-1])


@pytest.mark.parametrize("path, quant", cases())
def test_a_prefix_cache_hit_of_any_length_gives_the_same_logits(tiny, path, quant):
    """The prompt cached in slot 0; for every length n, its first n positions copied into slot 1
    (as Scheduler._reuse_prefix does) and the rest prefilled there: the last logits are the cold ones."""
    runner = make_runner(tiny, quant, path)
    cold = chunked(runner, PROMPT, [])[-1]
    layers = runner.model.transformer.layers
    for n in range(1, len(PROMPT)):
        for block in layers:
            cache = block.attn.cache
            cache.k[1].zero_(), cache.v[1].zero_()
            cache.k[1, :, :n] = cache.k[0, :, :n]
            cache.v[1, :, :n] = cache.v[0, :, :n]
        assert torch.equal(chunked(runner, PROMPT[n:], [], slot=1, start=n)[-1], cold), n


@pytest.mark.parametrize("path, quant", cases())
def test_a_decode_step_gives_the_same_logits_alone_or_beside_others(tiny, path, quant):
    """Eight sequences at other positions (lengths 3 .. 40) decode one token together; each
    sequence's row equals its step alone, and the last position of its prompt + token as one chunk."""
    runner = make_runner(tiny, quant, path)
    gen = torch.Generator().manual_seed(11)
    lengths = [3, 40, 17, 1, 24, 9, 31, 16]
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lengths]
    nexts = torch.randint(3, 1000, (8,), generator=gen).tolist()
    for slot, prompt in enumerate(prompts):
        chunked(runner, prompt, [], slot=slot)
    with torch.inference_mode():
        batch = runner(torch.tensor(nexts)[:, None], torch.tensor(lengths)[:, None], torch.arange(8),
                       span=max(lengths) + 1)[:, -1]
        for i, n in enumerate(lengths):
            alone = runner(torch.tensor([[nexts[i]]]), torch.tensor([[n]]), torch.tensor([i]), span=n + 1)[0, -1]
            assert torch.equal(batch[i], alone), i
            assert torch.equal(chunked(runner, prompts[i] + [nexts[i]], [], slot=8)[-1], alone), i


def greedy(engine, prompt: list[int], max_tokens: int = 24):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=5)
    return engine.backend.submit(prompt, params, engine.tokenizer.eos_ids)


def replies(channels) -> list[list[tuple]]:
    """Each channel's steps as (token, logprob, top logprobs), compared exactly."""
    return [[(s.token_id, s.logprob.logprob, tuple(s.logprob.top)) for s in channel] for channel in channels]


@pytest.mark.parametrize("quant", engine_quants())
def test_greedy_replies_are_identical_cold_cached_batched_and_speculated(tiny, quant):
    """Through the engine as a user meets it (the best kernel path): a request cold, again from
    the prefix cache, beside three others, and with speculation on; the same tokens and
    bitwise the same logprobs."""
    looping = [5, 6, 7, 8, 9, 10] * 4  # speculation's prompt lookup finds guesses in it
    prompts = [PROMPT, looping]
    others = [[40 + i, 300 + 7 * i, 12, 900 - i] * (i + 1) for i in range(3)]
    with closing(load_engine(tiny, backend="torch", dtype="float32", quant=quant, slots=4, speculation=False)) as plain:
        cold = [replies([greedy(plain, p)])[0] for p in prompts]
        assert plain.backend.scheduler.prefix_cache.bytes > 0
        assert [replies([greedy(plain, p)])[0] for p in prompts] == cold  # prefix-cache hits
        for p, expected in zip(prompts, cold):
            batched = replies([greedy(plain, o, 40) for o in others[:1]] + [greedy(plain, p)] +
                              [greedy(plain, o, 40) for o in others[1:]])
            assert batched[1] == expected
    with closing(load_engine(tiny, backend="torch", dtype="float32", quant=quant, slots=2, speculation=True)) as speculating:
        assert [replies([greedy(speculating, p)])[0] for p in prompts] == cold
        assert speculating.backend.scheduler.accepted_tokens > 0
        fingerprint = speculating.backend.info.system_fingerprint
        assert fingerprint == plain.backend.info.system_fingerprint and fingerprint.startswith("fp_")


def matmul_cases() -> list[tuple[str, str]]:
    """Every layer kind of the native plan, and ATen's int8/int4 kernels (its float32 and bf16
    GEMMs are not invariant: MKL's sgemm orders a row's sums differently at 1-3 and 5 rows)."""
    native_cases = [("native", quant) for quant in QUANTS] if native.load() is not None else []
    return native_cases + [("aten", "int8"), ("aten", "int4")]


@pytest.mark.parametrize("path, quant", matmul_cases())
@pytest.mark.parametrize("n, k", [(256, 128), (1152, 1280), (1280, 768)])
def test_matmuls_give_a_row_the_same_bits_whatever_the_rows_beside_it(path, quant, n, k):
    """A layer on 1 .. 34 rows (decode steps, and tiles down to single rows), 64, 65 and 300
    (prompt chunks, across the kernels' 64-row chunks): each row as in one 300-row call. The
    native plan's float32 and bf16 on float_linear, int8/int4 on quantize.py's native kernel; and
    ATen's int8/int4 kernels, which loop over rows: on ATen's path only its attention and float
    GEMMs depend on the batch."""
    linear = torch.nn.Linear(k, n, bias=False)
    if quant == "none":
        layer = lambda x: torch.ops.elmd.float_linear(x, linear.weight)
    elif quant == "bf16":
        layer = quantize.BF16Linear.from_linear(linear)
    else:
        layer = QuantizedLinear.from_float(linear, quantize.parse_quant(quant))
        assert layer.prepare("native" if path == "native" else "aten") == path
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(n))
    with torch.inference_mode():
        full = layer(x)
        for rows in [*range(1, 35), 64, 65, 300]:
            assert torch.equal(layer(x[:rows]), full[:rows]), rows
            assert torch.equal(layer(x[300 - rows:]), full[300 - rows:]), rows


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_copy_of_the_target_as_draft_keeps_every_guess_when_quantized(tiny, quant):
    """A draft that is the target at the same quant: its greedy guesses (decode steps) are what
    the target's verifying pass (a prompt chunk) picks, every time."""
    if paths()[0] == "aten":
        pytest.xfail(NOT_YET["aten", quant])
    with closing(load_engine(tiny, backend="torch", dtype="float32", quant=quant, slots=2, draft_dir=tiny,
                             draft_quant=quant)) as engine:
        for prompt in (PROMPT, list(range(100, 160))):
            replies([greedy(engine, prompt, 60)])
        scheduler = engine.backend.scheduler
        assert scheduler.proposed_tokens >= 50 and scheduler.accepted_tokens == scheduler.proposed_tokens


def other_paths() -> list[str]:
    if os.environ.get(IN_CHILD) or native.load() is None:
        return []
    flags = native.cpu_flags()
    builds = [b.path for b in native.BUILDS if b.cpu_flags <= flags]
    return builds[1:] + ["aten"]


@pytest.mark.parametrize("path", other_paths())
def test_the_other_kernel_paths_are_invariant_too(path):
    """This file again in a child forced onto `path` (ELMD_CPU_KERNELS), with the LoRA adapters'
    mixed batches and their agreement with PEFT (tests/test_lora.py) on that path."""
    lora = [f"{ROOT / 'tests' / 'test_lora.py'}::{test}" for test in
            ("test_a_mixed_batch_gives_each_row_its_logits_alone", "test_cached_forwards_match_peft")]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, *lora], capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "ELMD_CPU_KERNELS": path, IN_CHILD: "1"}, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:]
