"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from the
`tokenizer.ggml.*` metadata of a GGUF file.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) with a known
pre-tokenizer are rebuilt; the others are refused by name rather than guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# gguf.TokenType values, spelled out so that this module reads without the gguf package.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn even when the GGUF names a different EOS; llama.cpp
# stops on the same texts.
END_OF_TURN_TEXTS = {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"}


class UnsupportedTokenizerError(ValueError):
    """The GGUF's tokenizer is of a kind this importer cannot rebuild faithfully."""


@dataclass(frozen=True)
class SpecialIds:
    bos_id: int
    eos_id: int
    end_ids: frozenset[int]  # every id that ends generation (EOS and end-of-turn tokens)


def _pre_tokenizer(name: str):
    """The Hugging Face pre-tokenizer that matches llama.cpp's `tokenizer.ggml.pre`."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if name in ("smollm", "starcoder", "refact"):
        # Each digit is its own piece, then GPT-2's regex over bytes (SmolLM2's tokenizer.json).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name == "gpt-2":
        return byte_level
    raise UnsupportedTokenizerError(f"GGUF pre-tokenizer {name!r} is not supported (known: smollm, starcoder, refact, gpt-2)")


def build_tokenizer(fields: dict):
    """A `tokenizers.Tokenizer` equal to the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedTokenizerError(f"GGUF tokenizer model {kind!r} is not supported: only byte-level BPE ('gpt2')")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UnsupportedTokenizerError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in fields.get("tokenizer.ggml.merges", [])]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "gpt-2"))
    tokenizer.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    if fields.get("tokenizer.ggml.add_bos_token", False):
        bos = tokens[fields["tokenizer.ggml.bos_token_id"]]
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            )
        )
    tokenizer.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    return tokenizer


def special_ids(fields: dict) -> SpecialIds:
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type", [])
    bos = int(fields.get("tokenizer.ggml.bos_token_id", 1))
    eos = int(fields.get("tokenizer.ggml.eos_token_id", 2))
    ends = {eos}
    if "tokenizer.ggml.eot_token_id" in fields:
        ends.add(int(fields["tokenizer.ggml.eot_token_id"]))
    ends |= {i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_TURN_TEXTS}
    return SpecialIds(bos, eos, frozenset(ends))


def tokenizer_config(fields: dict, context_length: int) -> dict:
    """tokenizer_config.json: special tokens, BOS policy and the GGUF's chat template."""
    tokens = fields["tokenizer.ggml.tokens"]

    def text(key: str) -> str | None:
        index = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text("bos"),
        "eos_token": text("eos"),
        "unk_token": text("unknown"),
        "pad_token": text("padding"),
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if "tokenizer.chat_template" in fields:
        config["chat_template"] = fields["tokenizer.chat_template"]
    return {k: v for k, v in config.items() if v is not None}


def write_tokenizer(fields: dict, out_dir: Path, context_length: int) -> SpecialIds:
    """Write tokenizer.json and tokenizer_config.json; return the ids the model config needs."""
    build_tokenizer(fields).save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(fields, context_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return special_ids(fields)
