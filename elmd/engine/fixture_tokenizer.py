"""A small, deterministic LLaMA-2-style tokenizer for generated test checkpoints.

OpenELM uses the LLaMA-2 SentencePiece tokenizer, whose official copy is gated. Tests
need one that behaves the same way (byte fallback, `▁` for spaces, `<s>` prepended,
`</s>` as a special token) without a download, so this trains a small BPE vocabulary on
a built-in English corpus and writes it in LLaMA-2's `tokenizer.json` layout:

- ids 0, 1, 2: `<unk>`, `<s>`, `</s>`; ids 3..258: byte pieces `<0x00>`..`<0xFF>`;
  then the trained pieces, in the trainer's order.
- normalizer `Prepend("▁") + Replace(" ", "▁")`, no pre-tokenizer, decoder
  `Replace("▁", " ") + ByteFallback + Fuse + Strip(1 leading space)`: LLaMA-2's pipeline,
  including its "legacy" `▁` after special tokens, which is how OpenELM saw its prompts.

The Zephyr markers (`<|system|>`, `<|user|>`, `<|assistant|>`) are in the corpus as
ordinary text, as they are in the LLaMA-2 vocab. Output is byte-identical across runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))
SPACE = "▁"

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still write a clear sentence.
Once upon a time there was a little robot who wanted to learn how to read and write.
It asked the old computer in the library: what is the meaning of a word?
The computer said that every word is made of letters, and every letter has a sound.
You are a helpful assistant. Answer the question as well as you can, and be brief.
What is the capital of France? The capital of France is Paris.
What is the capital of Germany? The capital of Germany is Berlin.
How many legs does a spider have? A spider has eight legs, and an insect has six.
Please write a short poem about the sea, the sun and the wind.
The sea is blue, the sun is warm, and the wind sings a song over the water.
Translate to French: good morning, my friend. Bonjour, mon ami. Merci beaucoup.
We had coffee at the café, a naïve plan, and then a crème brûlée for dessert.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 2024. Lists: first, second, third.
Code: def add(a, b): return a + b  # adds two numbers
print("hello, world") and if x == 1: y = [1, 2, 3] or {"key": "value"}
Science explains the world with questions, experiments and careful measurements.
Water boils at one hundred degrees and freezes at zero degrees Celsius.
The model reads the prompt, predicts the next token, and repeats until it stops.
Rivers carry rain from the mountains to the valleys, where farmers grow wheat, rice and corn.
In winter the nights are long and cold; in summer the days are bright, hot and full of light.
My grandmother keeps a garden with tomatoes, onions, carrots, beans, apples and yellow flowers.
Every morning the baker opens his shop at six o'clock and sells fresh bread, cakes and cookies.
The museum shows paintings, statues, ancient coins, old maps and letters written by famous kings.
Students should practice reading, writing, listening and speaking every day to improve quickly.
Doctors recommend drinking water, sleeping eight hours, walking outside and eating vegetables.
The train leaves the station at noon, crosses the bridge, and arrives in the city before evening.
Birds build nests in spring; bees visit flowers; squirrels hide nuts for the coming winter months.
Engineers design machines, bridges, roads, engines, computers, phones and electric vehicles.
A good story has characters, a place, a problem, some surprising events and a satisfying ending.
Mathematics studies numbers, shapes, patterns, equations, probability, functions and proofs.
Our team played football on Saturday, won the match, and celebrated with pizza and lemonade.
Remember to save your work often, check your spelling, and ask questions when you are unsure.
The weather forecast says clouds tomorrow, light showers on Tuesday and sunshine on Wednesday.
Music can be quiet or loud, slow or fast, simple or complex, joyful, peaceful or mysterious.
Languages borrow words from each other: chocolate, tomato, coffee, piano, ballet and robot.
History teaches us about empires, revolutions, inventions, discoveries, wars and peace treaties.
Thursday, Friday, Sunday, Monday; January, February, March, April, May, June, July, August.
September, October, November, December: twelve months, fifty-two weeks, three hundred days.
Colors: red, orange, green, blue, purple, black, white, brown, pink, gray, silver and gold.
Animals: elephant, giraffe, tiger, lion, zebra, monkey, horse, sheep, rabbit, turtle, whale.
Kitchen: knife, spoon, fork, plate, bowl, glass, kettle, oven, fridge, sugar, salt, pepper.
Please summarize the following paragraph in one sentence, using simple and clear language.
Explain why the sky looks blue during the day and red or orange at sunrise and at sunset.
Write a function that returns the largest value in a list, or None when the list is empty.
<|system|>
You are a friendly chatbot who always answers politely.</s>
<|user|>
Hello! Can you tell me a joke about computers?</s>
<|assistant|>
Why did the computer go to the doctor? Because it had a virus!</s>
<|user|>
Thank you, that was funny. Tell me another one.</s>
<|assistant|>
"""


def write_tokenizer(directory: str | Path, vocab_size: int = 1024) -> int:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into
    `directory`. Returns the number of pieces: `vocab_size`, or fewer past what the
    built-in corpus can teach (about 1,650). A model's embedding may be larger; ids past
    the tokenizer's vocabulary decode to nothing."""
    reserved = len(SPECIAL_TOKENS) + len(BYTE_PIECES)
    if vocab_size <= reserved + 64:
        raise ValueError(f"vocab_size must be more than {reserved + 64}, got {vocab_size}")
    trained_vocab, merges = _train(vocab_size - reserved)
    vocab = {piece: i for i, piece in enumerate(SPECIAL_TOKENS + BYTE_PIECES + tuple(trained_vocab))}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "tokenizer.json", _tokenizer_json(vocab, merges))
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK})
    return len(vocab)


def _train(size: int) -> tuple[list[str], list[str]]:
    """BPE pieces and merges learnt on the corpus, words split at `▁` as SentencePiece does."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    # The special tokens are declared so that the corpus's `</s>` is never learnt as text.
    trainer = trainers.BpeTrainer(vocab_size=size + len(SPECIAL_TOKENS), special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    reserved = set(SPECIAL_TOKENS) | set(BYTE_PIECES)
    pieces = [p for p in sorted(model["vocab"], key=model["vocab"].__getitem__) if p not in reserved]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return pieces, merges


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])


def _tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": vocab[t],
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [vocab[BOS]], "tokens": [BOS]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _tokenizer_config() -> dict:
    """LLaMA-2's tokenizer_config.json without a chat template (OpenELM has none).

    `PreTrainedTokenizerFast` makes transformers (and so mlx-lm) use tokenizer.json as
    written; its `LlamaTokenizer` rebuilds the pipeline with a Metaspace pre-tokenizer that
    treats leading spaces differently from LLaMA-2's SentencePiece."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
                "model_max_length": 2048,
        "pad_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
