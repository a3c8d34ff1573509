"""Chat prompts: the Zephyr default (exact text and ids), a tokenizer's own template,
the models.yaml override, and rendering that matches transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer

from elmd.engine.chat_template import ZEPHYR_TEMPLATE, ChatTemplateError, render
from elmd.engine.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Germany? Réponds en français 🙂"},
]
ZEPHYR_TEXT = (
    "<s><|system|>\nYou are a helpful assistant.</s>\n"
    "<|user|>\nWhat is the capital of France?</s>\n"
    "<|assistant|>\nThe capital of France is Paris.</s>\n"
    "<|user|>\nAnd of Germany? Réponds en français 🙂</s>\n"
    "<|assistant|>\n"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_zephyr_is_the_default_and_renders_exactly(tok):
    assert tok.chat_template == ZEPHYR_TEMPLATE
    assert tok.apply_chat_template(CONVERSATION) == ZEPHYR_TEXT


def test_zephyr_without_system_or_generation_prompt(tok):
    text = tok.apply_chat_template(CONVERSATION[1:3], add_generation_prompt=False)
    assert text == (
        "<s><|user|>\nWhat is the capital of France?</s>\n<|assistant|>\nThe capital of France is Paris.</s>\n"
    )


def test_zephyr_token_ids_exactly(tok_dir, tok):
    # Expected ids from the raw tokenizers library, piece by piece: BOS, then each stretch
    # between the `</s>` markers (LLaMA-2 puts a "▁" before each), joined by EOS.
    raw = RawTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    stretches = ZEPHYR_TEXT.removeprefix("<s>").split("</s>")
    expected = [raw.token_to_id("<s>")]
    for i, stretch in enumerate(stretches):
        if i:
            expected.append(raw.token_to_id("</s>"))
        expected += raw.encode(stretch, add_special_tokens=False).ids
    assert raw.id_to_token(expected[-1]) == "<0x0A>"
    assert raw.encode(stretches[1], add_special_tokens=False).tokens[:2] == ["▁", "<0x0A>"]
    ids = tok.encode_chat(CONVERSATION)
    assert ids == expected
    assert ids.count(1) == 1 and ids.count(2) == 4


def test_zephyr_matches_transformers_apply_chat_template(tok_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    text = hf.apply_chat_template(CONVERSATION, chat_template=ZEPHYR_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert text == ZEPHYR_TEXT
    ids = hf.apply_chat_template(CONVERSATION, chat_template=ZEPHYR_TEMPLATE, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.encode_chat(CONVERSATION) == list(ids)


def test_content_parts_are_joined_by_newlines(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "é 🙂"}]}]
    assert tok.apply_chat_template(parts) == "<s><|user|>\nLook:\né 🙂</s>\n<|assistant|>\n"
    assert tok.apply_chat_template([{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]) == ZEPHYR_TEXT
    with pytest.raises(ChatTemplateError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_unknown_role_is_refused(tok):
    with pytest.raises(ChatTemplateError, match="tool"):
        tok.apply_chat_template([{"role": "tool", "content": "42"}])


def _with_config(tok_dir: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in tok_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_tokenizer_config_template_wins_over_zephyr(tok_dir, tmp_path):
    t = Tokenizer.from_dir(_with_config(tok_dir, tmp_path / "m", chat_template=CHATML))
    assert t.chat_template == CHATML
    assert t.apply_chat_template(CONVERSATION[:2]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # This template has no BOS of its own, so encode_chat adds the model's one.
    ids = t.encode_chat(CONVERSATION[:2])
    assert ids[0] == 1 and ids.count(1) == 1


def test_named_templates_and_chat_template_jinja(tok_dir, tmp_path):
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    assert Tokenizer.from_dir(_with_config(tok_dir, tmp_path / "a", chat_template=named)).chat_template == CHATML
    d = _with_config(tok_dir, tmp_path / "b")
    (d / "chat_template.jinja").write_text(CHATML)
    assert Tokenizer.from_dir(d).chat_template == CHATML


def test_override_wins_over_everything(tok_dir, tmp_path):
    override = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    t = Tokenizer.from_dir(_with_config(tok_dir, tmp_path / "m", chat_template=CHATML), chat_template=override)
    assert t.apply_chat_template(CONVERSATION[1:2]) == "[user] What is the capital of France?\n"


def test_renders_like_transformers_helpers():
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{{ messages | tojson }}|{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}"
    )
    msgs = [{"role": "user", "content": "<b>& \"é\""}]
    assert render(template, msgs, bos_token="<s>", eos_token="</s>", add_generation_prompt=False) == (
        '[{"role": "user", "content": "<b>& \\"é\\""}]|<s>|</s>|False'
    )
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render(template, [{"role": "system", "content": "x"}])


def test_templates_are_sandboxed():
    with pytest.raises(ChatTemplateError):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
