"""The benchmark's llama.cpp peer gets the same weights: the GGUF written from a checkpoint
holds its tensors exactly, with the metadata llama.cpp's OpenELM loader reads; where
llama-cpp-python is installed, llama.cpp's logits on it match elmd's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from elmd.engine.checkpoint import load_model, read_config

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import llamacpp  # noqa: E402


def _tensors(reader) -> dict[str, np.ndarray]:
    """Each tensor as stored, in the checkpoint's [out, in] orientation, as float32."""
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
        out[t.name] = data.reshape(list(reversed([int(n) for n in t.shape])))
    return out


def test_f32_gguf_holds_every_tensor_exactly_with_openelm_metadata(tiny_checkpoint, tmp_path):
    cfg = read_config(tiny_checkpoint)
    reader = gguf.GGUFReader(llamacpp.write_gguf(tiny_checkpoint, tmp_path / "m.gguf", "f32"))

    assert reader.fields["general.architecture"].contents() == "openelm"
    assert reader.fields["openelm.block_count"].contents() == cfg.num_transformer_layers
    assert reader.fields["openelm.attention.head_count"].contents() == cfg.num_query_heads
    assert reader.fields["openelm.attention.head_count_kv"].contents() == cfg.num_kv_heads
    assert reader.fields["openelm.feed_forward_length"].contents() == cfg.ffn_dims
    assert reader.fields["openelm.rope.dimension_count"].contents() == cfg.head_dim
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == cfg.vocab_size

    state = {k: v.float().numpy() for k, v in load_file(tiny_checkpoint / "model.safetensors").items()}
    stored = _tensors(reader)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert len(stored) == 2 + 9 * cfg.num_transformer_layers
    np.testing.assert_array_equal(stored["token_embd.weight"], state["transformer.token_embeddings.weight"])
    for i, width in enumerate(cfg.ffn_dims):
        hub = f"transformer.layers.{i}."
        np.testing.assert_array_equal(stored[f"blk.{i}.attn_qkv.weight"], state[hub + "attn.qkv_proj.weight"])
        np.testing.assert_array_equal(stored[f"blk.{i}.attn_k_norm.weight"], state[hub + "attn.k_norm.weight"])
        fused = np.concatenate([stored[f"blk.{i}.ffn_gate.weight"], stored[f"blk.{i}.ffn_up.weight"]])
        assert stored[f"blk.{i}.ffn_gate.weight"].shape[0] == width
        np.testing.assert_array_equal(fused, state[hub + "ffn.proj_1.weight"])
        np.testing.assert_array_equal(stored[f"blk.{i}.ffn_down.weight"], state[hub + "ffn.proj_2.weight"])


def test_bf16_gguf_rounds_the_matrices_and_keeps_the_norms_in_f32(tiny_checkpoint, tmp_path):
    reader = gguf.GGUFReader(llamacpp.write_gguf(tiny_checkpoint, tmp_path / "m.gguf", "bf16"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.BF16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    state = load_file(tiny_checkpoint / "model.safetensors")
    np.testing.assert_array_equal(_tensors(reader)["blk.1.attn_output.weight"],
                                  state["transformer.layers.1.attn.out_proj.weight"].bfloat16().float().numpy())


def test_a_model_without_qk_norm_is_refused_by_name(tmp_path):
    from elmd.fixtures import write_checkpoint

    model = write_checkpoint(tmp_path / "noqk", shape="tiny", config_overrides={"normalize_qk_projections": False})
    with pytest.raises(ValueError, match="QK-norm"):
        llamacpp.write_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the llamacpp extra) is not installed")
def test_llama_cpp_logits_on_the_gguf_match_elmds(tiny_checkpoint, tmp_path):
    import llama_cpp

    ids = [1, 17, 300, 45, 999, 123, 7, 512, 88, 640]
    with torch.no_grad():
        want = load_model(tiny_checkpoint)(torch.tensor([ids]), torch.arange(len(ids))[None])[0].numpy()
    path = llamacpp.write_gguf(tiny_checkpoint, tmp_path / "m.gguf", "f32")
    f32 = 0  # GGML_TYPE_F32: an f32 KV cache, so the weights alone are compared
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, type_k=f32, type_v=f32, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
