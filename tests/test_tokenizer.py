"""The tokenizer on the generated LLaMA-2-style fixture (and a SentencePiece-only model):
round trips, streaming detokenization, BOS/EOS, and agreement with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer

from elmd.fixtures.tokenizer import write_tokenizer
from elmd.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world, the capital of France is Paris.",
    "Crème brûlée, naïve façade, Ångström, Øresund, ñandú.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 🙂👍🏽 🇫🇷 👩‍👩‍👧 and ✨ done",
    "  two leading spaces, double  inside, trailing ",
    "lines\nwith\n\ttabs\n\nand blank ones\n",
    "mixed: café 你好 🙂 x",
]


def stream(detok, ids) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


# -- the fixture tokenizer ---------------------------------------------------------


def test_fixture_is_byte_identical_across_runs(tmp_path):
    write_tokenizer(tmp_path / "a")
    write_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_fixture_has_llama2_layout(tok_dir):
    raw = RawTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = raw.get_vocab()
    assert [raw.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [raw.id_to_token(i) for i in (3, 3 + 0x0A, 258)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    assert len(vocab) == 1024
    assert len(set(vocab.values())) == len(vocab) == max(vocab.values()) + 1
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and "chat_template" not in cfg


def test_fixture_vocab_size(tmp_path):
    assert write_tokenizer(tmp_path / "a", vocab_size=512) == 512
    assert Tokenizer.from_dir(tmp_path / "a").vocab_size == 512
    # Past what the built-in corpus teaches, the vocabulary stops short.
    n = write_tokenizer(tmp_path / "b", vocab_size=32000)
    assert 1024 < n < 32000 and Tokenizer.from_dir(tmp_path / "b").vocab_size == n


def test_zephyr_markers_are_text_not_special_tokens(tok):
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):
        ids = tok.encode(marker, add_bos=False)
        assert len(ids) >= 1 and not set(ids) & {0, 1, 2}
        assert tok.decode(ids) == marker


# -- encode / decode -------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.decode(ids) == text


def test_non_ascii_falls_back_to_bytes(tok_dir, tok):
    raw = RawTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    pieces = [raw.id_to_token(i) for i in tok.encode("你", add_bos=False)]
    assert pieces == ["▁", "<0xE4>", "<0xBD>", "<0xA0>"]


def test_leading_space_is_sentencepiece_style(tok):
    # A dummy prefix space is added on encode and removed on decode; real spaces stay.
    assert tok.token_text(tok.encode("Hello", add_bos=False)[0]).startswith(" ")
    assert tok.decode(tok.encode(" Hello")) == " Hello"
    assert tok.decode(tok.encode("Hello")) == "Hello"


def test_bos_handling(tok):
    assert tok.bos_id == 1 and tok.add_bos
    assert tok.encode("hi")[:1] == [1]
    assert tok.encode("hi", add_bos=False)[:1] != [1]
    assert tok.encode("hi") == [1, *tok.encode("hi", add_bos=False)]
    assert tok.encode("") == [1]
    # Written-out "<s>" is the BOS token itself, as in transformers.
    assert tok.encode("<s>hi", add_bos=False)[0] == 1


def test_eos_ids_and_specials(tok):
    assert tok.eos_ids == frozenset({2})
    assert tok.decode([1, *tok.encode("ok", add_bos=False), 2]) == "ok"


def test_token_text(tok):
    hello = tok.encode("Hello", add_bos=False)
    assert "".join(tok.token_text(i) for i in hello) == " Hello"
    assert tok.token_text(3 + 0x0A) == "\n"
    assert tok.token_text(3 + 0xE4) == "<0xE4>"
    assert tok.token_text(1) == "<s>"
    # A model's embedding may be larger than the vocabulary: such ids have no text.
    assert (tok.token_text(tok.vocab_size), tok.token_bytes(tok.vocab_size)) == ("", b"")
    assert tok.decode([*tok.encode("ok"), tok.vocab_size]) == "ok"


def test_token_bytes_rebuild_the_text(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert b"".join(tok.token_bytes(i) for i in ids).decode()[1:] == text  # less the dummy prefix
    assert tok.token_bytes(3 + 0xE4) == b"\xe4"
    assert tok.token_bytes(1) == b"<s>"


# -- streaming -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_matches_full_decode_chunk_by_chunk(tok, text):
    ids = tok.encode(text)
    chunks = stream(tok.detokenizer(), ids)
    so_far = ""
    for n, chunk in enumerate(chunks[:-1], start=1):
        assert "\ufffd" not in chunk
        so_far += chunk
        # Everything emitted is final: it is a prefix of the full text at every step.
        assert text.startswith(so_far), (n, so_far)
        assert len(so_far) >= len(tok.decode(ids[:n]).rstrip("\ufffd")) - 1
    assert so_far + chunks[-1] == tok.decode(ids) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# "▁" itself is excluded: like SentencePiece, the tokenizer reads it as a space.
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="▁"), max_size=40),
       prompt=st.sampled_from(["", "Say:", "é", "你好"]))
def test_any_text_round_trips_and_streams(tok, text, prompt):
    assume(not any(special in text for special in ("<s>", "</s>", "<unk>")))  # these are read as tokens
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    context = tok.encode(prompt)
    chunks = stream(tok.detokenizer(context), ids[1:])
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == tok.decode(context + ids[1:])[len(prompt):]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_ids_stream_exactly_as_they_decode(tok, data):
    # Random ids, byte pieces in bulk: invalid UTF-8 included, as an untrained model writes.
    ids = data.draw(st.lists(st.one_of(st.integers(3, 258), st.integers(0, tok.vocab_size + 3)), max_size=30))
    chunks = stream(tok.detokenizer(), ids)
    assert not any(c.endswith("\ufffd") for c in chunks[:-1])
    assert "".join(chunks) == tok.decode(ids)


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok.encode("🙂", add_bos=False)  # "▁" + four byte pieces
    detok = tok.detokenizer()
    assert [detok.add(i) for i in ids] == ["", "", "", "", "🙂"]
    assert detok.flush() == ""


def test_flush_returns_an_incomplete_character_as_decode_does(tok):
    ids = tok.encode("ok 你", add_bos=False)[:-1]  # last byte of 你 missing
    chunks = stream(tok.detokenizer(), ids)
    assert "".join(chunks[:-1]) == "ok "
    assert "".join(chunks) == tok.decode(ids) == "ok \ufffd"


def test_streaming_with_prompt_context_keeps_the_first_space(tok):
    prompt = tok.encode("The capital of France is")
    full = tok.encode("The capital of France is Paris 你好.")
    assert full[: len(prompt)] == prompt
    generated = full[len(prompt) :]
    assert "".join(stream(tok.detokenizer(prompt), generated)) == " Paris 你好."
    # Without context it is a plain decode, which drops SentencePiece's leading space.
    assert "".join(stream(tok.detokenizer(), generated)) == tok.decode(generated) == "Paris 你好."


def test_context_ending_inside_a_character(tok):
    prompt = tok.encode("Say 你好")
    detok = tok.detokenizer(prompt)
    assert "".join(detok.add(i) for i in tok.encode("世界", add_bos=False)) + detok.flush() == " 世界"


def test_special_tokens_in_a_stream_add_no_text(tok):
    ids = [*tok.encode("Hi", add_bos=False), 2, *tok.encode("there", add_bos=False)]
    assert "".join(stream(tok.detokenizer(), ids)) == tok.decode(ids) == "Hi there"


# -- loading -------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_bos_and_eos_fall_back_to_config_json(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path / "m")
    _edit_json(d / "tokenizer_config.json", bos_token=None, eos_token=None)
    (d / "special_tokens_map.json").unlink()
    _edit_json(d / "config.json", bos_token_id=1, eos_token_id=2)
    t = Tokenizer.from_dir(d)
    assert (t.bos_id, t.eos_ids) == (1, frozenset({2}))
    assert t.encode("x")[0] == 1


def test_add_bos_token_false_is_respected(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path / "m")
    _edit_json(d / "tokenizer_config.json", add_bos_token=False)
    t = Tokenizer.from_dir(d)
    assert not t.add_bos and 1 not in t.encode("hi")


def test_without_add_bos_token_the_post_processor_decides(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path / "m")
    _edit_json(d / "tokenizer_config.json", add_bos_token=None)
    assert Tokenizer.from_dir(d).add_bos


def test_eos_ids_include_generation_config_and_end_of_turn_tokens(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path / "m")
    spec = json.loads((d / "tokenizer.json").read_text())
    im_end = len(spec["model"]["vocab"])
    spec["added_tokens"].append(
        {"id": im_end, "content": "<|im_end|>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
    )
    (d / "tokenizer.json").write_text(json.dumps(spec))
    _edit_json(d / "generation_config.json", eos_token_id=[2, 7])
    t = Tokenizer.from_dir(d)
    assert t.eos_ids == frozenset({2, 7, im_end})
    assert t.encode("a<|im_end|>", add_bos=False)[-1] == im_end


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer.from_dir(tmp_path)


# -- agreement with transformers (what mlx-lm and the hub use) -------------------------------


def test_agrees_with_transformers_autotokenizer(tok_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [*TEXTS, "", "<s>x</s>\n<|user|>\nhi</s>"]
    for text in texts:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False), text
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, 2)


# -- a byte-level BPE tokenizer.json (GPT-2 style, as the GGUF importer writes) ----------


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory) -> Path:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from elmd.fixtures import tokenizer as fixture_tokenizer

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(fixture_tokenizer._CORPUS.splitlines(), trainer=trainer)
    d = tmp_path_factory.mktemp("bytelevel")
    raw.save(str(d / "tokenizer.json"))
    _edit_json(d / "tokenizer_config.json", eos_token="<|endoftext|>", add_bos_token=False)
    return d


def test_byte_level_tokenizer(byte_level_dir):
    t = Tokenizer.from_dir(byte_level_dir)
    assert t.bos_id is None and not t.add_bos
    assert t.eos_ids == frozenset({0, 1})  # eos_token and the <|im_end|> end-of-turn token
    for text in TEXTS:
        ids = t.encode(text)
        assert t.decode(ids) == text
        chunks = stream(t.detokenizer(), ids)
        assert not any("\ufffd" in c for c in chunks) and "".join(chunks) == text
        assert b"".join(t.token_bytes(i) for i in ids).decode() == text
    hello = t.encode(" Hello")
    assert "".join(t.token_text(i) for i in hello) == " Hello"


# -- a lone SentencePiece model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    sentencepiece = pytest.importorskip("sentencepiece")
    from elmd.fixtures import tokenizer as fixture_tokenizer

    d = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(fixture_tokenizer._CORPUS.splitlines()),
        model_prefix=str(d / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",  # as LLaMA-2: no NFKC, spaces kept
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (d / "tokenizer.vocab").unlink()
    _edit_json(d / "tokenizer_config.json", add_bos_token=True, bos_token="<s>", eos_token="</s>")
    return d


def test_sentencepiece_model_alone(spm_dir):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    t = Tokenizer.from_dir(spm_dir)
    assert (t.bos_id, t.eos_ids, t.vocab_size) == (1, frozenset({2}), 400)
    for text in TEXTS:
        ids = t.encode(text)
        assert ids == [1, *sp.encode(text)]
        assert t.decode(ids) == sp.decode(ids) == text
        chunks = stream(t.detokenizer(), ids)
        assert not any("\ufffd" in c for c in chunks) and "".join(chunks) == text


def test_sentencepiece_splits_special_tokens_written_in_text(spm_dir):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    t = Tokenizer.from_dir(spm_dir)
    ids = t.encode("<s>Hi</s>\nthere", add_bos=False)
    assert ids == [1, *sp.encode("Hi"), 2, *sp.encode("\nthere")]
    assert t.decode(ids) == "Hi \nthere"  # the legacy "▁" after a special token, as with tokenizer.json
    assert t.token_text(sp.piece_to_id("▁the")) == " the"
    assert t.token_bytes(sp.piece_to_id("<0xE4>")) == b"\xe4"


def test_sentencepiece_alone_cannot_be_constrained(spm_dir):
    """llguidance reads tokenizer.json; a lone tokenizer.model is refused by name, not half-supported."""
    from elmd.engine.grammar import GrammarCompiler, GrammarError

    with pytest.raises(GrammarError, match="tokenizer.json"):
        GrammarCompiler(Tokenizer.from_dir(spm_dir), 400)
