"""The model's tokenizer: text <-> ids, chat prompts, and streaming detokenization.

Loaded from the model directory: `tokenizer.json` through the `tokenizers` library, or a
lone SentencePiece `tokenizer.model`; `tokenizer_config.json` (then `config.json`) says
which tokens are BOS/EOS and whether BOS is prepended (OpenELM: yes). Special-token text
such as `</s>` in a rendered chat prompt is read as the special token, as transformers
does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from elmd.engine import chat_template as templates

SPACE = "▁"  # SentencePiece's space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Tokens that end a turn in common chat formats; they stop generation when the vocab has them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """Text <-> token ids for one model, with its chat template."""

    def __init__(
        self,
        backend: "_Backend",
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        extra_eos_ids: Iterable[int] = (),
        chat_template: str,
    ):
        self._backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        end_of_turn = {i for i in map(backend.token_to_id, _END_OF_TURN) if i in backend.special_ids}
        self.eos_ids = frozenset(i for i in (eos_id, *extra_eos_ids) if i is not None) | end_of_turn
        self.add_bos = add_bos and self.bos_id is not None
        self.vocab_size = backend.vocab_size
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | Path, chat_template: str | None = None) -> "Tokenizer":
        """Loads the tokenizer of the model in `path`; `chat_template` overrides the model's."""
        path = Path(path)
        cfg = _read_json(path / "tokenizer_config.json")
        specials_map = _read_json(path / "special_tokens_map.json")
        model_cfg = _read_json(path / "config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        if (path / "tokenizer.json").is_file():
            backend: _Backend = _HFBackend(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(path / "tokenizer.model")
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")

        def special(name: str) -> str | None:
            token = _token_content(cfg.get(name)) or _token_content(specials_map.get(name))
            if token is None and isinstance(model_cfg.get(f"{name}_id"), int):
                token = backend.id_to_token(model_cfg[f"{name}_id"])
            return token

        bos_token = special("bos_token")
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = backend.adds_bos(backend.token_to_id(bos_token) if bos_token else None)
        return cls(
            backend,
            bos_token=bos_token,
            eos_token=special("eos_token"),
            add_bos=bool(add_bos),
            extra_eos_ids=[*_ids(model_cfg.get("eos_token_id")), *_ids(gen_cfg.get("eos_token_id"))],
            chat_template=templates.select_template(chat_template, _own_template(path, cfg)),
        )

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS first when `add_bos` (default: the model's rule)."""
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (BOS, EOS) are left out."""
        return self._backend.decode(ids)

    def apply_chat_template(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        return templates.render(
            self.chat_template,
            messages,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            add_generation_prompt=add_generation_prompt,
        )

    def encode_chat(self, messages: Iterable[Mapping[str, Any]]) -> list[int]:
        """Prompt ids for a conversation, ready for the assistant's reply: one BOS, never two."""
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        template_has_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.encode(text, add_bos=False if template_has_bos else None)

    def tokenizer_json(self) -> str | None:
        """The tokenizer in tokenizers' JSON form (what grammar libraries load); None for
        a lone SentencePiece model."""
        return self._backend.to_json() if isinstance(self._backend, _HFBackend) else None

    def detokenizer(self, context: Sequence[int] = ()) -> "IncrementalDetokenizer":
        """A streaming decoder. `context` (the prompt's ids) makes the first token's
        leading space come out as in the full text (" Paris" after "... is")."""
        return IncrementalDetokenizer(self, context)

    def token_text(self, token_id: int) -> str:
        """One token's own text, for logprobs: " Hello", "\\n"; a byte of a longer
        character keeps its `<0xE2>` form, so that distinct tokens stay distinct. An id
        past the vocabulary (a model's embedding may be larger) has no text, as in `decode`."""
        return self._backend.token_text(token_id) if self._backend.has_id(token_id) else ""

    def token_bytes(self, token_id: int) -> bytes:
        """One token's exact bytes (OpenAI logprobs' `bytes`): b"\\xe4" for the byte
        piece `<0xE4>`, which `token_text` can only name."""
        return self._backend.token_bytes(token_id) if self._backend.has_id(token_id) else b""

    def _is_char_continuation(self, token_id: int) -> bool:
        """Whether the token is a byte-fallback piece in the middle of a UTF-8 character."""
        byte = self._backend.byte_value(token_id)
        return byte is not None and 0x80 <= byte < 0xC0


class IncrementalDetokenizer:
    """Turns generated ids into text as they come, never splitting a character.

    Each step decodes a short window (the tokens emitted last + the new ones) and emits
    what it adds beyond the emitted part, so SentencePiece's leading-space rule applies to
    the window's first token, not to each new one; text ending in an incomplete UTF-8
    sequence (U+FFFD) is held back until the rest arrives."""

    _CONTEXT_TOKENS = 4

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self._decode = tokenizer.decode
        start = max(0, len(context) - self._CONTEXT_TOKENS)
        while start > 0 and tokenizer._is_char_continuation(context[start]):
            start -= 1  # begin the window on a character boundary
        self._window = list(context[start:])
        self._emitted = len(self._window)  # window[:_emitted] is text already given out

    def add(self, token_id: int) -> str:
        self._window.append(token_id)
        emitted = self._decode(self._window[: self._emitted])
        text = self._decode(self._window)
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        del self._window[: self._emitted]
        self._emitted = len(self._window)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD, as in `decode`)."""
        text = self._decode(self._window)[len(self._decode(self._window[: self._emitted])) :]
        self._window, self._emitted = [], 0
        return text


class _Backend(Protocol):
    vocab_size: int
    special_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def token_text(self, token_id: int) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def has_id(self, token_id: int) -> bool: ...
    def byte_value(self, token_id: int) -> int | None: ...
    def adds_bos(self, bos_id: int | None) -> bool: ...


class _HFBackend:
    """tokenizer.json, used exactly as written (normalizer, model, decoder)."""

    def __init__(self, file: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        decoder = json.loads(self._tok.decoder.__getstate__()) if self._tok.decoder else {}
        steps = decoder.get("decoders", [decoder])
        self._sentencepiece_pieces = _is_sentencepiece_decoder(steps)
        self._strips_first_space = self._sentencepiece_pieces and self._tok.decoder.decode([SPACE + "a"]) == "a"
        self._byte_level_pieces = any(step.get("type") == "ByteLevel" for step in steps)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def to_json(self) -> str:
        return self._tok.to_str()

    def decode(self, ids: Sequence[int]) -> str:
        if not self._sentencepiece_pieces:
            return self._tok.decode(list(ids), skip_special_tokens=True)
        # Our own SentencePiece decoding: tokenizers' ByteFallback turns a whole run of byte
        # pieces into U+FFFD when any of it is invalid, which no streaming decoder can know
        # in advance; per-character replacement keeps stream == decode for any ids.
        pieces = (self._tok.id_to_token(i) for i in ids if i not in self.special_ids)
        return _decode_pieces([p for p in pieces if p is not None], self._strips_first_space)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def has_id(self, token_id: int) -> bool:
        return token_id >= 0 and self._tok.id_to_token(token_id) is not None

    def byte_value(self, token_id: int) -> int | None:
        return _byte_value(self._tok.id_to_token(token_id)) if self._sentencepiece_pieces else None

    def token_text(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        if token_id in self.special_ids:
            return piece
        if self._sentencepiece_pieces:
            return _piece_text(piece)
        return self._tok.decoder.decode([piece]) if self._tok.decoder else piece

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if token_id not in self.special_ids:
            if self._sentencepiece_pieces:
                return _piece_bytes(piece)
            if self._byte_level_pieces:
                return bytes(_BYTE_LEVEL_DECODE[c] for c in piece)
        return self.token_text(token_id).encode()

    def adds_bos(self, bos_id: int | None) -> bool:
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bos_id is not None and ids[:1] == [bos_id]


class _SentencePieceBackend:
    """A lone tokenizer.model. Control pieces written in the text (`</s>` in a chat
    prompt) are split out first and each stretch between them is encoded on its own,
    as transformers' slow LlamaTokenizer does."""

    def __init__(self, file: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        self.vocab_size = self._sp.get_piece_size()
        self.special_ids = frozenset(
            i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)
        )
        self._special_by_text = {self._sp.id_to_piece(i): i for i in self.special_ids}
        specials = sorted(self._special_by_text, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._strips_first_space = self._sp.encode("a", out_type=str)[0].startswith(SPACE)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._special_split.split(text) if self._special_split else [text]:
            if part in self._special_by_text:
                ids.append(self._special_by_text[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        pieces = [self._sp.id_to_piece(i) for i in ids if i not in self.special_ids and self.has_id(i)]
        return _decode_pieces(pieces, self._strips_first_space)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if self._sp.is_unknown(i) and token != self._sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def byte_value(self, token_id: int) -> int | None:
        return _byte_value(self._sp.id_to_piece(token_id))

    def has_id(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size

    def token_text(self, token_id: int) -> str:
        piece = self._sp.id_to_piece(token_id)
        return piece if token_id in self.special_ids else _piece_text(piece)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._sp.id_to_piece(token_id)
        return piece.encode() if token_id in self.special_ids else _piece_bytes(piece)

    def adds_bos(self, bos_id: int | None) -> bool:
        return bos_id is not None  # LlamaTokenizer's default


def _byte_value(piece: str | None) -> int | None:
    m = _BYTE_PIECE.fullmatch(piece or "")
    return int(m[1], 16) if m else None


def _is_sentencepiece_decoder(steps: list[dict]) -> bool:
    """Whether a tokenizer.json decoder only maps `▁` to spaces, fuses byte pieces and
    strips the first space: LLaMA-2's (or a Metaspace one), which `_decode_pieces` equals."""
    def known(step: dict) -> bool:
        kind = step.get("type")
        if kind == "Replace":
            return step.get("pattern") == {"String": SPACE} and step.get("content") == " "
        if kind == "Strip":
            return step.get("content") == " " and step.get("stop") == 0
        return kind in ("ByteFallback", "Fuse", "Metaspace")

    kinds = {step.get("type") for step in steps}
    return all(map(known, steps)) and bool(kinds & {"Replace", "Metaspace"})


def _decode_pieces(pieces: Iterable[str], strip_first_space: bool) -> str:
    text = b"".join(map(_piece_bytes, pieces)).decode("utf-8", errors="replace")
    return text[1:] if strip_first_space and text.startswith(" ") else text


def _piece_bytes(piece: str) -> bytes:
    byte = _byte_value(piece)
    return bytes([byte]) if byte is not None else piece.replace(SPACE, " ").encode()


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character; this undoes it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL_DECODE = _byte_level_alphabet()


def _piece_text(piece: str) -> str:
    byte = _byte_value(piece)
    if byte is not None:
        return chr(byte) if byte < 0x80 else piece
    return piece.replace(SPACE, " ")


def _own_template(path: Path, cfg: Mapping[str, Any]) -> str | None:
    """The tokenizer's chat template: chat_template.jinja / .json, or tokenizer_config's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template") or cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or None


def _token_content(token: Any) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)
