"""GGUF -> OpenELM conversion: the permutation, the layout, the tokenizer, the refusals,
and the `elmd import` command.

A tiny llama GGUF written here with the `gguf` package is checked against an independent
numpy forward pass that uses the GGUF's own tensors the way llama.cpp does (interleaved
RoPE pairs on the permuted Q/K rows), so the conversion is proven on the math, not on
names. The real SmolLM2 file is checked for its config, layout and tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elmd.convert import UnsupportedModelError, UnsupportedTokenizerError, import_gguf, offline_model_path
from elmd.convert.gguf import make_divisible, unpermute_qk
from elmd.engine.checkpoint import load_model
from elmd.engine.openelm import OpenELM, OpenELMConfig
from elmd.engine.tokenizer import Tokenizer
from offline_checkpoint import converted

gguf = pytest.importorskip("gguf")

TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġa", "c", "d", "e", "f"]


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Q and K rows: within each head, row j of
    the first rotary half and row j of the second become rows 2j and 2j+1."""
    rows, cols = weight.shape
    half = rows // heads // 2
    out = np.empty_like(weight)
    for h in range(heads):
        for j in range(half):
            for side in (0, 1):
                out[h * 2 * half + 2 * j + side] = weight[h * 2 * half + side * half + j]
    return out


@pytest.mark.parametrize("heads,head_dim", [(9, 64), (3, 64), (4, 8)])
def test_unpermute_undoes_the_converter_permutation(heads, head_dim):
    weight = np.arange(heads * head_dim * 5, dtype=np.float32).reshape(heads * head_dim, 5)
    permuted = llama_cpp_permute(weight, heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_qk(permuted, heads), weight)


# ---------------------------------------------------------------- a tiny llama GGUF


TINY = dict(layers=2, dim=32, heads=4, kv_heads=2, head_dim=8, ffn=64, eps=1e-5, base=10000.0)


def write_tiny_gguf(path: Path, *, arch: str = "llama", extra_tensors=(), tokenizer_model: str = "gpt2",
                    untied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A llama GGUF with random F32 weights; returns its tensors (numpy row-major shapes)."""
    rng = np.random.default_rng(seed)
    c = TINY
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(c["dim"])
    writer.add_feed_forward_length(c["ffn"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_rope_freq_base(c["base"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TINY_TOKENS) - 3))
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"token_embd.weight": w(len(TINY_TOKENS), c["dim"], scale=1.0), "output_norm.weight": 1 + w(c["dim"])}
    if untied:
        tensors["output.weight"] = w(len(TINY_TOKENS), c["dim"])
    q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    for i in range(c["layers"]):
        tensors |= {
            f"blk.{i}.attn_norm.weight": 1 + w(c["dim"]),
            f"blk.{i}.attn_q.weight": w(q, c["dim"]),
            f"blk.{i}.attn_k.weight": w(kv, c["dim"]),
            f"blk.{i}.attn_v.weight": w(kv, c["dim"]),
            f"blk.{i}.attn_output.weight": w(c["dim"], q),
            f"blk.{i}.ffn_norm.weight": 1 + w(c["dim"]),
            f"blk.{i}.ffn_gate.weight": w(c["ffn"], c["dim"]),
            f"blk.{i}.ffn_up.weight": w(c["ffn"], c["dim"]),
            f"blk.{i}.ffn_down.weight": w(c["dim"], c["ffn"]),
        }
    for name, shape in extra_tensors:
        tensors[name] = w(*shape)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def llama_cpp_logits(t: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """The tiny model's logits computed from the GGUF tensors as llama.cpp's llama graph does:
    RoPE rotates adjacent pairs (2i, 2i+1) of the stored (permuted) Q/K rows."""
    c, n = TINY, len(ids)
    hd, rep = c["head_dim"], c["heads"] // c["kv_heads"]

    def rms(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c["eps"]) * weight

    theta = c["base"] ** (-np.arange(0, hd, 2) / hd)
    angle = np.arange(n)[:, None] * theta[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

    def rope_pairs(x):  # x: [n, heads, hd]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    x = t["token_embd.weight"][ids].astype(np.float64)
    causal = np.tril(np.ones((n, n), dtype=bool))
    for i in range(c["layers"]):
        b = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"blk.{i}.")}
        h = rms(x, b["attn_norm.weight"])
        q = rope_pairs((h @ b["attn_q.weight"].T).reshape(n, c["heads"], hd))
        k = rope_pairs((h @ b["attn_k.weight"].T).reshape(n, c["kv_heads"], hd))
        v = (h @ b["attn_v.weight"].T).reshape(n, c["kv_heads"], hd)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
        x = x + attn @ b["attn_output.weight"].T
        h = rms(x, b["ffn_norm.weight"])
        gate = h @ b["ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ b["ffn_up.weight"].T)) @ b["ffn_down.weight"].T
    head = t.get("output.weight", t["token_embd.weight"])
    return rms(x, t["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("untied", [False, True])
def test_converted_tiny_model_computes_what_llama_cpp_computes(tmp_path, untied):
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf", untied=untied)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "model", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["share_input_output_layers"] is (not untied)

    ids = [3, 5, 7, 4, 9, 10, 11, 6, 8, 3]
    model = load_model(out, dtype=torch.float32)
    with torch.inference_mode():
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0].double().numpy()
    np.testing.assert_allclose(ours, llama_cpp_logits(tensors, ids), atol=2e-4)


def test_refuses_another_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "g.gguf", arch="gemma")
    with pytest.raises(UnsupportedModelError, match="'gemma'"):
        import_gguf(tmp_path / "g.gguf", tmp_path / "out")


def test_refuses_biases(tmp_path):
    write_tiny_gguf(tmp_path / "b.gguf", extra_tensors=[("blk.0.attn_q.bias", (32,))])
    with pytest.raises(UnsupportedModelError, match="biases"):
        import_gguf(tmp_path / "b.gguf", tmp_path / "out")


def test_refuses_a_sentencepiece_vocabulary(tmp_path):
    write_tiny_gguf(tmp_path / "s.gguf", tokenizer_model="llama")
    with pytest.raises(UnsupportedTokenizerError, match="'llama'"):
        import_gguf(tmp_path / "s.gguf", tmp_path / "out")


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a model")
    with pytest.raises(UnsupportedModelError, match="not a GGUF file"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out")


# ---------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    return converted(tmp_path_factory)


def test_config_is_a_uniform_openelm(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "openelm"
    assert config["num_transformer_layers"] == 30 and config["model_dim"] == 576 and config["head_dim"] == 64
    assert config["num_query_heads"] == [9] * 30 and config["num_kv_heads"] == [3] * 30
    widths = {make_divisible(m * config["model_dim"], config["ffn_dim_divisor"]) for m in config["ffn_multipliers"]}
    assert widths == {1536} and OpenELMConfig.from_dict(config).ffn_dims == [1536] * 30
    assert config["normalize_qk_projections"] is False
    assert config["rms_norm_eps"] == 1e-5 and config["rope_freq_constant"] == 100000
    assert config["share_input_output_layers"] is True
    assert config["max_context_length"] == 8192 and config["vocab_size"] == 49152
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_weights_have_the_hub_names_and_shapes(smollm2):
    from safetensors import safe_open

    cfg = OpenELMConfig.from_dict(json.loads((smollm2 / "config.json").read_text()))
    with torch.device("meta"):
        wanted = {name: tuple(p.shape) for name, p in OpenELM(cfg).named_parameters()}
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert f.get_slice("transformer.norm.weight").get_dtype() == "BF16"
    assert found == wanted
    assert wanted["transformer.layers.0.attn.qkv_proj.weight"] == ((9 + 2 * 3) * 64, 576)
    assert wanted["transformer.layers.0.ffn.proj_1.weight"] == (2 * 1536, 576)


@pytest.fixture(scope="module")
def tokenizer(smollm2) -> Tokenizer:
    return Tokenizer.from_dir(smollm2)


TEXTS = [
    "Hello world! It's 2024, and 3.14159 is pi.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n",
    "naïve café — 東京 🙂",
    "def f(x):\n    return x**2  # square",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_agrees_with_transformers(smollm2, tokenizer, text):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smollm2))
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert reference.decode(ids) == text


def test_tokenizer_follows_smollm2_rules(tokenizer):
    assert tokenizer.encode("2024") == [tokenizer._backend.token_to_id(d) for d in "2024"]  # one digit each
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.add_bos is False  # the GGUF says tokenizer.ggml.add_bos_token = false
    assert tokenizer.bos_id == 1
    assert {2, 0} <= tokenizer.eos_ids  # <|im_end|> ends a turn; <|endoftext|> ends a text


def test_tokenizer_config_carries_the_gguf_chat_template(smollm2):
    reader = gguf.GGUFReader(str(offline_model_path()))
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert config["chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    assert 2 in generation["eos_token_id"]


# ---------------------------------------------------------------- `elmd import`


def test_directory_check_names_a_tensor_the_config_does_not_fit(tmp_path):
    from elmd.convert.checkpoint_dir import CheckpointDirError, checkpoint_files

    write_tiny_gguf(tmp_path / "tiny.gguf")
    model = import_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    assert checkpoint_files(model) == [
        "config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "tokenizer_config.json",
    ]  # fmt: skip
    config = json.loads((model / "config.json").read_text())
    config["num_query_heads"] = [8, 8]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointDirError, match=r"qkv_proj.weight has shape \(64, 32\), the config needs \(96, 32\)"):
        checkpoint_files(model)


def elmd(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ELMD_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "elmd", *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_imports_a_gguf_and_a_checkpoint_directory(tmp_path):
    write_tiny_gguf(tmp_path / "Tiny-Llama.Q8_0.gguf")
    home = tmp_path / "home"
    result = elmd(home, "import", str(tmp_path / "Tiny-Llama.Q8_0.gguf"))
    assert result.returncode == 0, result.stderr
    installed = home / "data" / "models" / "tiny-llama"
    assert "tiny-llama" in result.stdout and (installed / "config.json").is_file()
    manifest = json.loads((installed / "elmd.json").read_text())
    assert manifest["source"]["kind"] == "gguf-file" and "model.safetensors" in manifest["files"]

    again = elmd(home, "import", str(tmp_path / "Tiny-Llama.Q8_0.gguf"))
    assert again.returncode == 1 and "already installed" in again.stderr and "--force" in again.stderr
    assert elmd(home, "import", str(tmp_path / "Tiny-Llama.Q8_0.gguf"), "--force").returncode == 0

    copied = elmd(home, "import", str(installed), "--name", "tiny-copy")
    assert copied.returncode == 0, copied.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (home / "data" / "models" / "tiny-copy" / name).read_bytes() == (installed / name).read_bytes()


def test_cli_refuses_what_it_cannot_serve(tmp_path):
    home = tmp_path / "home"
    write_tiny_gguf(tmp_path / "gemma.gguf", arch="gemma")
    result = elmd(home, "import", str(tmp_path / "gemma.gguf"))
    assert result.returncode == 1 and "'gemma'" in result.stderr

    llama_dir = tmp_path / "llama-dir"
    llama_dir.mkdir()
    (llama_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = elmd(home, "import", str(llama_dir))
    assert result.returncode == 1 and "model_type 'llama'" in result.stderr

    write_tiny_gguf(tmp_path / "tiny.gguf")
    import_gguf(tmp_path / "tiny.gguf", tmp_path / "broken")
    (tmp_path / "broken" / "tokenizer.json").unlink()
    result = elmd(home, "import", str(tmp_path / "broken"))
    assert result.returncode == 1 and "no tokenizer" in result.stderr
    assert not (home / "data" / "models" / "broken").exists()
